"""Payload layouts, names and numbers (vhost-user.rst)."""
import pytest

from vfe.vhost.messages import (
    Config, Empty, Inflight, Log, MemoryRegion, MemTable, Payload, ProtocolError, ProtocolFeature,
    Request, SingleMemRegion, U64, VringAddr, VringFile, VringState, REPLY_FLAGS, NEED_REPLY,
    HEADER_SIZE, request_name,
)

SPEC_NUMBERS = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4, "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9,
    "SET_VRING_BASE": 10, "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13,
    "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16,
    "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18, "SEND_RARP": 19, "NET_SET_MTU": 20,
    "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23, "GET_CONFIG": 24,
    "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39,
    "GET_STATUS": 40,
}

PF_NUMBERS = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "MTU": 4, "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10,
    "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16,
}


@pytest.mark.parametrize("name,number", sorted(SPEC_NUMBERS.items(), key=lambda kv: kv[1]))
def test_request_numbers(name, number):
    assert Request[name] == number
    assert request_name(number) == name


def test_protocol_feature_numbers():
    for name, number in PF_NUMBERS.items():
        assert ProtocolFeature[name] == number


def test_header_constants():
    assert HEADER_SIZE == 12 and REPLY_FLAGS == 0x5 and NEED_REPLY == 0x8
    assert request_name(99) == "request 99"


ROUND_TRIPS = [
    (U64(0xDEADBEEF_CAFEBABE), 8),
    (VringState(3, 256), 8),
    (VringFile(7, False), 8),
    (VringFile(2, True), 8),
    (VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0x9000), 40),
    (MemoryRegion(0x100000, 0x200000, 0x7F0000000000, 0x1000), 32),
    (MemTable((MemoryRegion(0, 4096, 0x1000, 0), MemoryRegion(8192, 4096, 0x9000, 4096))), 8 + 64),
    (SingleMemRegion(MemoryRegion(0, 4096, 0x1000, 0)), 40),
    (Log(8192, 0), 16),
    (Inflight(4096, 0, 2, 128), 24),
    (Config(4, 3, 0, b"abc"), 15),
    (Empty(), 0),
]


@pytest.mark.parametrize("obj,size", ROUND_TRIPS, ids=lambda o: type(o).__name__)
def test_round_trip(obj, size):
    data = obj.encode()
    assert len(data) == size
    assert type(obj).decode(data) == obj


@pytest.mark.parametrize("cls,size", [(U64, 8), (VringState, 8), (VringAddr, 40), (MemoryRegion, 32),
                                      (SingleMemRegion, 40), (Log, 16), (Inflight, 24), (Empty, 0)])
def test_wrong_size_is_a_protocol_error(cls, size):
    for bad in (size - 1, size + 1):
        if bad < 0:
            continue
        with pytest.raises(ProtocolError):
            cls.decode(bytes(bad))


def test_vring_file_bits():
    f = VringFile.decode(U64(0x105).encode())
    assert f == VringFile(5, True) and f.value == 0x105
    with pytest.raises(ProtocolError):
        VringFile.decode(U64(0x200).encode())      # reserved bit


def test_vring_addr_is_valid():
    good = VringAddr(0, 0, 0x1000, 0x2004, 0x1802, 0)
    assert good.is_valid()
    assert not VringAddr(0, 2, 0x1000, 0x2004, 0x1802, 0).is_valid()        # unknown flag
    assert not VringAddr(0, 0, 0x1008, 0x2004, 0x1802, 0).is_valid()        # desc % 16
    assert not VringAddr(0, 0, 0x1000, 0x2002, 0x1802, 0).is_valid()        # used % 4
    assert not VringAddr(0, 0, 0x1000, 0x2004, 0x1801, 0).is_valid()        # avail % 2
    assert not VringAddr(0, 0, 0, 0x2004, 0x1802, 0).is_valid()             # zero
    assert VringAddr(0, 1, 0x1000, 0x2004, 0x1802, 0x5000).log


def test_memory_region_is_valid():
    assert MemoryRegion(0, 4096, 0x1000, 0).is_valid()
    assert not MemoryRegion(0, 0, 0x1000, 0).is_valid()
    assert not MemoryRegion(2**64 - 4096, 8192, 0x1000, 0).is_valid()      # gpa wraps
    assert not MemoryRegion(0, 8192, 2**64 - 4096, 0).is_valid()           # uva wraps


def test_mem_table_sizes():
    one = MemTable((MemoryRegion(0, 4096, 0x1000, 0),))
    assert MemTable.decode(one.encode()) == one
    full = one.encode() + bytes(7 * 32)                 # whole 8-region array sent
    assert MemTable.decode(full) == one
    with pytest.raises(ProtocolError):
        MemTable.decode(one.encode() + bytes(8))        # neither exact nor full
    with pytest.raises(ProtocolError):
        MemTable.decode((9).to_bytes(4, "little") + bytes(4 + 9 * 32))
    assert not MemTable(()).is_valid()


def test_config_layout():
    c = Config.decode(Config(0, 4, 1, b"\1\2\3\4").encode())
    assert (c.offset, c.size, c.flags, c.payload) == (0, 4, 1, b"\1\2\3\4")
    with pytest.raises(ProtocolError):                  # size field disagrees
        Config.decode((0).to_bytes(4, "little") + (5).to_bytes(4, "little") + bytes(4) + b"abcd")
    assert not Config(0, 0, 0, b"").is_valid()
    assert not Config(0, 1, 7, b"x").is_valid()


def test_inflight_and_log_validity():
    assert Inflight(4096, 0, 1, 128).is_valid()
    assert not Inflight(4096, 0, 0, 128).is_valid()
    assert Log(8192, 0).is_valid() and not Log(0, 0).is_valid() and not Log(2**63, 1).is_valid()


@pytest.mark.parametrize("cls", [U64, VringState, VringFile, VringAddr, MemoryRegion, SingleMemRegion,
                                 Log, Inflight, Empty], ids=lambda c: c.__name__)
def test_a_fixed_size_payload_has_its_size_as_both_bounds(cls):
    assert issubclass(cls, Payload) and cls.MIN_SIZE == cls.MAX_SIZE == cls.SIZE
    assert len(cls.decode(bytes(cls.SIZE)).encode()) == cls.SIZE


def test_variable_size_payload_bounds():
    assert (MemTable.MIN_SIZE, MemTable.MAX_SIZE) == (8, 8 + 8 * MemoryRegion.SIZE)
    assert (Config.MIN_SIZE, Config.MAX_SIZE) == (12, 12 + 4096)
    assert not hasattr(MemTable, "SIZE") and not hasattr(Config, "SIZE")

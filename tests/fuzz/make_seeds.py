"""Write the seed corpora of the ring fuzz targets (corpus/net_ring,
corpus/blk_ring): a handful of small inputs that reach each path once --
frames delivered (plain, mergeable, through an indirect table, needing a
software checksum or segmentation, at a region's end, across two
regions), block requests of every type on both backends, an inflight
region fresh and with requests to resubmit, a duplicate head -- plus a
few broken rings.  Run it after changing an input layout:
``python3 -m tests.fuzz.make_seeds``."""
from __future__ import annotations

import os
import struct

from tests.fuzz.ring_input import enc_desc, enc_ring, enc_table

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4
# feature bits of target_net_ring's feature bytes
N_INDIRECT, N_EVENT_IDX, N_MRG, N_V1, N_CSUM, N_GCSUM, N_GTSO4, N_GTSO6 = (1 << k for k in range(8))
SIZE8 = 2                         # the size byte for 8 entries


def vnet_hdr(flags=0, gso=0, hdr_len=0, gso_size=0, csum_start=0, csum_off=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_off, 0)


def eth(payload: bytes, dst=b"\xff" * 6, ethertype=0x0800) -> bytes:
    return dst + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + payload


def ipv4_tcp(payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return ip + tcp


def rx_buffers(n: int, length: int) -> list[bytes]:
    """n writable buffers of `length` bytes in the buffers' second page."""
    step = max(length // 16, 1)
    return [enc_desc(1, i * step, length, WRITE) for i in range(n)]


def net(fa: int, fb: int, tx: bytes, rx: bytes, table: bytes = b"\0\0\0", blob: bytes = b"") -> bytes:
    return bytes([fa, fb, SIZE8]) + tx + rx + table + blob


def net_seeds() -> dict[str, bytes]:
    f = eth(bytes(range(46)))
    frame = vnet_hdr() + f
    big = vnet_hdr() + eth(bytes(300))
    tcp = eth(ipv4_tcp(b"x" * 1006))          # 12 + 1060 = 134 << 3: encodable
    rx4 = enc_ring(rx_buffers(4, 512), 8, [0, 1, 2, 3])
    one = enc_ring([enc_desc(0, 0, len(frame))], 8, [0])
    v1 = N_V1 | N_INDIRECT
    return {
        "plain": net(v1, v1, one, rx4, blob=frame),
        "mergeable": net(v1, v1 | N_MRG, enc_ring([enc_desc(0, 0, len(big))], 8, [0]),
                         enc_ring(rx_buffers(8, 64), 8, list(range(8))), blob=big),
        "indirect": net(v1, v1, enc_ring([enc_desc(0, 64, 32, INDIRECT)], 8, [0]), rx4,
                        enc_table(1024, [enc_desc(0, 0, 20, NEXT, 1),
                                         enc_desc(2, 20, len(frame) - 20)]), frame),
        "event_idx": net(v1 | N_EVENT_IDX, v1 | N_EVENT_IDX,
                         enc_ring([enc_desc(0, 0, len(frame))], 8, [0], used_event=0),
                         enc_ring(rx_buffers(4, 512), 8, [0, 1, 2, 3], used_event=0), blob=frame),
        "soft_csum": net(v1, v1, enc_ring([enc_desc(0, 0, 12 + 60)], 8, [0]), rx4,
                         blob=vnet_hdr(1, 0, 0, 0, 34, 16) + eth(ipv4_tcp(bytes(6)))),
        "soft_tso": net(v1 | N_CSUM, v1 | N_MRG,
                        enc_ring([enc_desc(0, 0, 12 + len(tcp))], 8, [0]),
                        enc_ring(rx_buffers(8, 512), 8, list(range(8))),
                        blob=vnet_hdr(1, 1, 54, 200, 34, 16) + tcp),
        "unicast": net(v1, v1, one, rx4, blob=vnet_hdr() + eth(bytes(range(46)),
                                                            dst=b"\x02\x00\x00\x00\x00\x0b")),
        "at_region_end": net(v1, v1, enc_ring([enc_desc(3, 72, 72)], 8, [0]), rx4, blob=frame),
        "across_regions": net(v1, v1, enc_ring([enc_desc(4, 20, 72)], 8, [0]), rx4, blob=frame),
        "head_out_of_range": net(v1, v1, enc_ring([], 8, [0x1000]), rx4, blob=frame),
        "loop": net(v1, v1, enc_ring([enc_desc(0, 0, 40, NEXT, 1), enc_desc(0, 2, 32, NEXT, 0)],
                                     8, [0]), rx4, blob=frame),
        "nested_indirect": net(v1, v1, enc_ring([enc_desc(0, 64, 16, INDIRECT)], 8, [0]), rx4,
                               enc_table(1024, [enc_desc(0, 64, 16, INDIRECT)]), frame),
        "rx_bad_head": net(v1, v1, one, enc_ring([], 8, [9]), blob=frame),
    }


# -- blk

def blk_req(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def blk(mode: int, ring: bytes, inflight: bytes = b"", table: bytes = b"\0\0\0",
        blob: bytes = b"") -> bytes:
    return bytes([mode | (SIZE8 << 4)]) + ring + inflight + table + blob


def chain(out_len: int = 0, in_len: int = 0) -> list[bytes]:
    """Descriptors 0..: the header (buffers + 0), data out (buffers + 16),
    data in (second page), status (second page + 3 KiB)."""
    d = [enc_desc(0, 0, 16, NEXT, 1)]
    if out_len:
        d.append(enc_desc(0, 1, out_len, NEXT, len(d) + 1))
    if in_len:
        d.append(enc_desc(1, 0, in_len, WRITE | NEXT, len(d) + 1))
    d.append(enc_desc(1, 192, 1, WRITE))
    return d


def inflight(version_sel: int, entries: list[tuple[int, int, int]], used_behind: int = 0,
             last_batch: int = 0) -> bytes:
    """Shape: the ring's own; header: version by selector, desc_num the
    ring size; entries (flag, next, counter) for 8 heads."""
    e = list(entries) + [(0, 0, 0)] * (8 - len(entries))
    return (bytes([0, 0, version_sel, 0]) + last_batch.to_bytes(2, "little")
            + bytes([used_behind]) + b"".join(bytes(x) for x in e))


def blk_seeds() -> dict[str, bytes]:
    FILE, IND, EVT, INF, DWZ = 1, 2, 4, 8, 0x40
    one = [0]
    data = bytes(range(256)) * 2
    rng = struct.pack("<QII", 8, 8, 0)
    return {
        "read": blk(0, enc_ring(chain(in_len=512), 8, one), blob=blk_req(0, 1)),
        "write": blk(0, enc_ring(chain(out_len=512), 8, one), blob=blk_req(1, 2) + data),
        "file_write": blk(FILE, enc_ring(chain(out_len=512), 8, one), blob=blk_req(1, 3) + data),
        "file_read": blk(FILE, enc_ring(chain(in_len=1024), 8, one), blob=blk_req(0, 3)),
        "flush": blk(FILE, enc_ring(chain(), 8, one), blob=blk_req(4)),
        "get_id": blk(0, enc_ring(chain(in_len=20), 8, one), blob=blk_req(8)),
        "discard": blk(FILE | DWZ, enc_ring(chain(out_len=16), 8, one), blob=blk_req(11) + rng),
        "write_zeroes": blk(DWZ, enc_ring(chain(out_len=16), 8, one), blob=blk_req(13) + rng),
        "indirect": blk(IND, enc_ring([enc_desc(0, 64, 48, INDIRECT)], 8, one),
                        table=enc_table(1024, chain(in_len=512)), blob=blk_req(0, 5)),
        "event_idx": blk(EVT, enc_ring(chain(in_len=512), 8, one, used_event=0),
                         blob=blk_req(0, 1)),
        "inflight_fresh": blk(INF, enc_ring(chain(in_len=512), 8, one), inflight(0, []),
                              blob=blk_req(0, 1)),
        "inflight_resubmit": blk(INF | FILE, enc_ring(chain(out_len=512), 8, one),
                                 inflight(0x80, [(1, 0, 7)], used_behind=0),
                                 blob=blk_req(1, 9) + data),
        "inflight_last_batch": blk(INF, enc_ring(chain(in_len=512), 8, one),
                                   inflight(0x80, [(1, 3, 1), (0, 0, 0), (0, 0, 0), (1, 0, 2)],
                                            used_behind=2, last_batch=3),
                                   blob=blk_req(0, 1)),
        "inflight_bad_version": blk(INF, enc_ring(chain(in_len=512), 8, one),
                                    bytes([0, 0, 0xF0, 0]) + (7).to_bytes(2, "little")
                                    + bytes(3), blob=blk_req(0, 1)),
        "duplicate_head": blk(FILE, enc_ring(chain(out_len=512), 8, [0, 0]),
                              blob=blk_req(1, 4) + data),
        "head_out_of_range": blk(INF, enc_ring(chain(in_len=512), 8, [0x1000]), inflight(0, []),
                                 blob=blk_req(0, 1)),
    }


def main() -> None:
    for name, seeds in (("net_ring", net_seeds()), ("blk_ring", blk_seeds())):
        d = os.path.join(HERE, "corpus", name)
        os.makedirs(d, exist_ok=True)
        for stem, data in seeds.items():
            with open(os.path.join(d, stem), "wb") as f:
                f.write(data)
        print(f"{d}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()

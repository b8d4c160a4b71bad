"""vfe.macaddr: the one MAC address parser and formatter."""
import pytest

from vfe.macaddr import format_mac, is_mac, mac_add, parse_mac, random_local_mac


def test_parse_and_format():
    assert parse_mac("52:54:00:12:AB:cd") == bytes.fromhex("52540012abcd")
    assert format_mac(bytes.fromhex("52540012abcd")) == "52:54:00:12:ab:cd"
    assert format_mac(0x52540012ABCD) == "52:54:00:12:ab:cd"


@pytest.mark.parametrize("text", ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "525400123456",
                                  "52-54-00-12-34-56", "52:54:00:12:34:5", "+2:54:00:12:34:56",
                                  " 2:54:00:12:34:56", "52:54:00:12:34:5g", "52:54:00:12:34:56\n"])
def test_parse_refuses(text):
    with pytest.raises(ValueError, match="bad MAC address"):
        parse_mac(text)


def test_format_refuses_other_lengths():
    with pytest.raises(ValueError):
        format_mac(b"\x00" * 5)


def test_is_mac_agrees_with_the_parser():
    assert is_mac("52:54:00:12:AB:cd")
    assert not is_mac("52-54-00-12-34-56")
    assert not is_mac(None)


def test_mac_arithmetic_carries_and_wraps():
    assert mac_add("00:11:22:33:44:ff", 1) == "00:11:22:33:45:00"
    assert mac_add("ff:ff:ff:ff:ff:ff", 1) == "00:00:00:00:00:00"
    assert mac_add("0C:C4:7A:FF:22:93", 2) == "0c:c4:7a:ff:22:95"


def test_random_macs_are_locally_administered_unicast():
    macs = {random_local_mac() for _ in range(64)}
    assert len(macs) > 60                       # random, not one fixed value
    for mac in macs:
        first = parse_mac(mac)[0]
        assert first & 0x02 and not first & 0x01, mac

"""vfe.macaddr: the one MAC address parser and formatter."""
import pytest

from vfe.macaddr import format_mac, parse_mac


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

"""NBD URIs: the four schemes, the export name, the TLS parameters, and what is refused."""

from __future__ import annotations

import pytest

from blocktrail.errors import InvalidArgument
from blocktrail.nbd.uri import NbdEndpoint, NbdUri, TlsParameters, is_nbd_uri


@pytest.mark.parametrize(("text", "expected"), [
    ("nbd://example.com/disk0", NbdUri(NbdEndpoint(host="example.com"), "disk0")),
    ("nbd://10.0.0.1:10810/", NbdUri(NbdEndpoint(host="10.0.0.1", port=10810), "")),
    ("nbd://[::1]:999/a%20b", NbdUri(NbdEndpoint(host="::1", port=999), "a b")),
    ("nbd://h", NbdUri(NbdEndpoint(host="h"), "")),
    ("nbd://h//x@snap", NbdUri(NbdEndpoint(host="h"), "/x@snap")),
    ("nbd+unix:///disk0@nightly?socket=/run/nbd.sock",
     NbdUri(NbdEndpoint(unix_path="/run/nbd.sock"), "disk0@nightly")),
    ("NBDS://h/d?tls-certificates=/etc/pki/qemu",
     NbdUri(NbdEndpoint(host="h"), "d", TlsParameters(certificates="/etc/pki/qemu"))),
    ("nbds+unix:///d?socket=/s&tls-psk-file=/k.psk&tls-username=alice",
     NbdUri(NbdEndpoint(unix_path="/s"), "d", TlsParameters(psk_file="/k.psk", username="alice"))),
    ("nbds://h/d", NbdUri(NbdEndpoint(host="h"), "d", TlsParameters())),
    ("nbd+unix:///a+b%2Bc?socket=/run/a+b.sock",  # "+" is a plus sign, as libnbd reads it
     NbdUri(NbdEndpoint(unix_path="/run/a+b.sock"), "a+b+c")),
    ("nbd://h/%C3%A9t%C3%A9", NbdUri(NbdEndpoint(host="h"), "\u00e9t\u00e9")),
    ("nbd+unix:///d?socket=/s%26t%3D", NbdUri(NbdEndpoint(unix_path="/s&t="), "d")),
    ("nbd+unix:///d?&socket=/s&", NbdUri(NbdEndpoint(unix_path="/s"), "d")),  # empty items
])
def test_parse_and_normal_form(text: str, expected: NbdUri) -> None:
    uri = NbdUri.parse(text)
    assert uri == expected
    assert NbdUri.parse(str(uri)) == uri
    assert is_nbd_uri(text)


@pytest.mark.parametrize(("text", "match"), [
    ("http://h/d", "scheme"),
    ("nbd+unix:///d", "needs \\?socket"),
    ("nbd+unix://host/d?socket=/s", "takes no host"),
    ("nbd:///d", "needs a host"),
    ("nbd://h/d?socket=/s", "socket= is for"),
    ("nbd://h/d?tls-psk-file=/k", "TLS parameters need"),
    ("nbd://h/d?sockett=/s", "unknown parameter"),
    ("nbd://h:99999/d", "invalid NBD URI"),
    ("nbd://user@h/d", "user@"),
    ("nbd://h/d#frag", "fragment"),
    ("nbd://h/d%FF", "export name is not UTF-8"),  # not U+FFFD: two URIs, one name
    ("nbd://h/d%FE", "export name is not UTF-8"),
    ("nbd://h/d%00x", "NUL"),
    ("nbd+unix:///d?socket=/s%00", "NUL"),
    ("nbd+unix:///d?socket=/s%FF", "socket= is not UTF-8"),
    ("nbd://h:0/d", "port 0"),
    ("nbd+unix:///d?socket=/a&socket=/b", "socket= is given more than once"),
    ("nbds://h/d?tls-certificates=/a&tls-certificates=/b", "given more than once"),
])
def test_invalid_uris_are_refused_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        NbdUri.parse(text)


def test_endpoints() -> None:
    assert NbdEndpoint.parse("unix:/run/x.sock") == NbdEndpoint(unix_path="/run/x.sock")
    assert NbdEndpoint.parse("tcp:0.0.0.0:10809") == NbdEndpoint(host="0.0.0.0")
    assert NbdEndpoint.parse("[::]:10809") == NbdEndpoint(host="::")
    assert str(NbdEndpoint(host="::", port=5)) == "tcp:[::]:5"
    assert str(NbdEndpoint(unix_path="/s")) == "unix:/s"
    for bad in ("unix:", "tcp:host", "host:port", "a:b:c"):
        with pytest.raises(InvalidArgument):
            NbdEndpoint.parse(bad)
    assert not is_nbd_uri("/srv/disks/vm1") and not is_nbd_uri("vm1")

"""A certificate's subject CN, notAfter and serial, read straight from its DER (expiry, reload).

Why not ``cryptography``: importing its x509 module costs the long-running agent about 8 MB of
resident memory (measured: VmRSS before and after the import, next to paho and grpc), a sixth
of its whole footprint, to read two fields. X.509's layout up to the subject is fixed
(RFC 5280 4.1): Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, subject, ... } }.
Anything that does not parse is ``ValueError``; the collector reports such a file unreadable.
tests/test_certinfo.py checks the figures against cryptography's on real certificates.
"""

from __future__ import annotations

import base64
import datetime as dt
import re

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_CN = bytes([0x06, 0x03, 0x55, 0x04, 0x03])  # OID 2.5.4.3, commonName
_INTEGER, _SEQUENCE, _SET, _UTC, _GENERALIZED = 0x02, 0x30, 0x31, 0x17, 0x18


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4 or at + n > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[at:at + n], "big")
        at += n
    if at + length > len(der):
        raise ValueError("DER element past the end")
    return tag, at, at + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, vs, ve = _tlv(der, start)
        out.append((tag, vs, ve))
        start = ve
    return out


def _time(tag: int, text: bytes) -> float:
    s = text.decode("ascii")
    if tag == _UTC:  # YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1)
        year = int(s[:2])
        s = f"{19 if year >= 50 else 20}{s}"
    elif tag != _GENERALIZED:
        raise ValueError("validity is not a time")
    when = dt.datetime.strptime(s, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    return when.timestamp()


def _common_name(der: bytes, start: int, end: int) -> str:
    for tag, vs, ve in _children(der, start, end):  # RDNs: SET of SEQUENCE {oid, value}
        if tag != _SET:
            continue
        for _, avs, _end in _children(der, vs, ve):
            if der[avs:avs + len(_CN)] == _CN:
                _, v0, v1 = _tlv(der, avs + len(_CN))
                return der[v0:v1].decode("utf-8", "replace")
    return ""


def read(der: bytes) -> tuple[str, float]:
    """(subject CN, notAfter as Unix time) of one DER certificate."""
    tag, vs, _ = _tlv(der, 0)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, tbs0, tbs1 = _tlv(der, vs)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    fields = _children(der, tbs0, tbs1)
    if fields and fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    if len(fields) < 5:
        raise ValueError("certificate too short")
    validity, subject = fields[3], fields[4]
    times = _children(der, validity[1], validity[2])
    if validity[0] != _SEQUENCE or len(times) != 2:
        raise ValueError("bad validity")
    tag, t0, t1 = times[1]
    return _common_name(der, subject[1], subject[2]), _time(tag, der[t0:t1])


def serial(der: bytes) -> int:
    """The serialNumber of one DER certificate (the first field after the version)."""
    tag, vs, _ = _tlv(der, 0)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    _, tbs0, tbs1 = _tlv(der, vs)
    fields = _children(der, tbs0, tbs1)
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]
    if not fields or fields[0][0] != _INTEGER:
        raise ValueError("no serial number")
    return int.from_bytes(der[fields[0][1]:fields[0][2]], "big", signed=True)


def serial_pem(pem: bytes) -> int:
    """The serialNumber of the first certificate in a PEM file."""
    blocks = _PEM.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    return serial(base64.b64decode(b"".join(blocks[0].split()), validate=True))


def read_pem(pem: bytes) -> list[tuple[str, float]]:
    """Every certificate in a PEM file (a CA file may hold several); ValueError if none."""
    blocks = _PEM.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    return [read(base64.b64decode(b"".join(block.split()), validate=True)) for block in blocks]

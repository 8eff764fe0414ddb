#!/usr/bin/env python3
"""Writes the seed fixtures of the fuzz targets (fuzz/seeds/<target>/*.bin).

Run from anywhere; the files are committed, this only documents how they
were made. Packets are the ones core/wire.rs and core/mod.rs test with.
"""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def csum_words(data, acc=0):
    if len(data) % 2:
        data = data + b"\0"
    for i in range(0, len(data), 2):
        acc += (data[i] << 8) | data[i + 1]
    return acc


def fold(acc):
    while acc > 0xFFFF:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def tcp_csum(src, dst, seg):
    acc = csum_words(bytes(src) + bytes(dst)) + 6 + len(seg)
    return (~fold(csum_words(seg, acc))) & 0xFFFF


def segment(flags, options=b"", data=b"", sport=40000, dport=80):
    doff = (20 + len(options)) // 4
    assert (20 + len(options)) % 4 == 0
    return (struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 0xFAF0, 0, 0)
            + options + data)


def packet(src, dst, seg, ident=0x1234, pad=b""):
    seg = bytearray(seg)
    seg[16:18] = struct.pack("!H", tcp_csum(src, dst, seg))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), ident, 0x4000, 64, 6, 0,
                                bytes(src), bytes(dst)))
    hdr[10:12] = struct.pack("!H", (~fold(csum_words(hdr))) & 0xFFFF)
    return bytes(hdr) + bytes(seg) + pad


LINUX_SYN_OPTS = bytes([2, 4, 5, 0xB4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
A = [198, 19, 0, 2]
B = [192, 0, 2, 1]
SYN = segment(0x02, LINUX_SYN_OPTS)
SYN_MSS_ONLY = segment(0x02, bytes([2, 4, 5, 0xB4]), b"hello")
ACK_DATA = segment(0x18, bytes([1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 1]), b"GET / HTTP/1.0\r\n\r\n")
RST = segment(0x14)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# wire_tun_packet: whole IPv4 packets; the id field is the MSS limit.
write("wire_tun_packet", "linux_syn_clamp_1360.bin", packet(A, B, SYN, ident=1360))
write("wire_tun_packet", "syn_mss_data_clamp_536.bin", packet(A, B, SYN_MSS_ONLY, ident=536))
write("wire_tun_packet", "ack_data_padded.bin", packet(B, A, ACK_DATA, pad=b"\0" * 6))
write("wire_tun_packet", "rst.bin", packet(A, B, RST))
udp = bytearray(packet(A, B, RST))
udp[9] = 17
write("wire_tun_packet", "udp_not_tcp.bin", bytes(udp))

# wire_segment: [mss limit:2][src:4][dst:4][id:2] + the segment (wire form:
# checksum for the 0.0.0.0 pseudo-header).
Z = [0, 0, 0, 0]


def wire_seg(seg):
    seg = bytearray(seg)
    seg[16:18] = struct.pack("!H", tcp_csum(Z, Z, seg))
    return bytes(seg)


def prefix(mss, src, dst, ident):
    return struct.pack("!H", mss) + bytes(src) + bytes(dst) + struct.pack("!H", ident)


write("wire_segment", "linux_syn.bin", prefix(1360, [198, 18, 0, 7], [198, 18, 0, 1], 1) + wire_seg(SYN))
write("wire_segment", "syn_mss_data.bin", prefix(1400, B, A, 2) + wire_seg(SYN_MSS_ONLY))
write("wire_segment", "ack_data.bin", prefix(1460, B, A, 3) + wire_seg(ACK_DATA))
write("wire_segment", "rst.bin", prefix(1460, B, A, 0xFFFF) + wire_seg(RST))

# core_both_ways: [flags, server gate cap, client gate cap, mtu] + ops
# (see the target). flags: bit 0 server auth, bit 1 client auth, >> 2 timeout.
def blob(b):
    return struct.pack("!H", len(b)) + b


CLIENT_TUN = [198, 19, 0, 2]
SERVER_REAL = [203, 0, 113, 1]
SERVER_TUN = [198, 18, 0, 1]
c2s = packet(CLIENT_TUN, SERVER_REAL, SYN)
c2s_data = packet(CLIENT_TUN, SERVER_REAL, ACK_DATA)
s2c = packet(SERVER_TUN, [198, 18, 0, 7], SYN_MSS_ONLY)
MTU_1400 = 225  # 500 + 225 * 4


def op(tag, *fields):
    return bytes([tag]) + b"".join(fields)


# Version 1: a SYN and data each way, a refresh, expiry.
write("core_both_ways", "v1_round_trip.bin",
      bytes([(20 << 2) | 0, 4, 2, MTU_1400])
      + op(7, b"\x03", b"\x00", blob(c2s))
      + op(8, b"\x03", b"\x00", blob(s2c))
      + op(7, b"\x03", b"\x00", blob(c2s_data))
      + op(9, struct.pack("!H", 5000))
      + op(2, b"\x09", b"\x00", blob(wire_seg(RST)))
      + op(5, struct.pack("!I", 20000))
      + op(0, b"\x1f", blob(s2c)))
# Version 2: leases on the client, admission on the server, a full gate.
write("core_both_ways", "v2_leases_admit.bin",
      bytes([(4 << 2) | 3, 2, 1, MTU_1400])
      + op(1, b"\x03", blob(c2s))
      + op(6, b"\x00", struct.pack("!I", 30000))
      + op(6, b"\x01", struct.pack("!I", 30000))
      + op(4, b"\x00") + op(4, b"\x01") + op(4, b"\x02")
      + op(7, b"\x03", b"\x00", blob(c2s))
      + op(8, b"\x03", b"\x00", blob(s2c))
      + op(3, b"\x00", b"\x01", blob(wire_seg(SYN)))
      + op(5, struct.pack("!I", 40000)))
# Lying lengths and junk on both sides, then a small pool filled up.
write("core_both_ways", "junk_and_full_pool.bin",
      bytes([(1 << 2), 16, 4, 1])
      + op(2, b"\x00", b"\x03", blob(wire_seg(RST)))
      + op(2, b"\x01", b"\x06", blob(wire_seg(SYN)))
      + op(3, b"\x10", b"\xff", blob(wire_seg(SYN)))
      + op(0, b"\x00", blob(b"\x60" + b"\0" * 39))
      + b"".join(op(2, bytes([p]), b"\x00", blob(wire_seg(RST))) for p in range(32))
      + op(5, struct.pack("!I", 1)))

# Regression (clamp_mss, found by wire_tun_packet): a SYN whose MSS option
# follows a NOP, so its value sits at an odd offset (23). Valid checksums.
NOP_MSS = segment(0x02, bytes([1, 2, 4, 5, 0xB4, 1, 1, 1]))
write("wire_tun_packet", "regression_nop_mss_odd_offset.bin", packet(A, B, NOP_MSS, ident=1360))
write("wire_segment", "regression_nop_mss_odd_offset.bin",
      prefix(1360, [198, 18, 0, 7], [198, 18, 0, 1], 1) + wire_seg(NOP_MSS))

# session_control: ops of the target (tag byte % 9 and its fields).
# 0 admit [id, resume flag, (resume id), client, src, counter:8]
# 2 client datagram [id, key, kind (0 keepalive, 1 response), echo:8,
#   counter skip, src, nonce:8, answer the challenge (bit 0)]
# 3 heard [src]; 4 time [units of 100 ms]; 5 client grant [id, lease s,
#   bound, counter:8]; 6 to the client [src sel, raw?, (bytes | id, kind,
#   counter:8, echo:8)]; 8 client timers.
def admit(ident, client=0, src=0, resume=None):
    r = b"\x00" if resume is None else bytes([1, resume])
    return bytes([0, ident]) + r + bytes([client, src]) + struct.pack("!Q", 1 << 20)


def client_dgram(ident, src, kind=0, key=None, echo=0, skip=0, answer=1):
    key = ident if key is None else key
    return (bytes([2, ident, 1 if key == ident else 0, kind]) + struct.pack("!Q", echo)
            + bytes([skip, src]) + struct.pack("!Q", 0xFEED) + bytes([answer]))


# Bind a path, move it (NAT rebinding to an IPv6 source), replay, forge,
# resume by a new session, and let it lapse.
write("session_control", "bind_move_replay_resume.bin",
      admit(0, src=0)
      + client_dgram(0, src=0)
      + bytes([3, 0]) + bytes([4, 10])
      + client_dgram(0, src=4)
      + client_dgram(0, src=4, skip=0x80, answer=0)
      + client_dgram(0, src=1, key=9, answer=0)
      + admit(1, src=0, resume=0)
      + client_dgram(1, src=2)
      + bytes([4, 250]) + bytes([4, 250]))
# The client side: a lease, acks and challenges from the server and from
# elsewhere, timers.
write("session_control", "client_acks_challenges.bin",
      bytes([5, 0, 30, 0]) + struct.pack("!Q", 1 << 20)
      + bytes([8])
      + bytes([6, 1, 1, 0, 1]) + struct.pack("!QQ", 5, 0x77)
      + bytes([6, 1, 1, 0, 0]) + struct.pack("!QQ", 6, 1 << 20)
      + bytes([6, 0, 0, 0]) + bytes([6, 1, 0, 48]) + b"\x01\x01" + b"\0" * 46
      + bytes([4, 50]) + bytes([8]) + bytes([4, 255]) + bytes([8]))

"""Hypothesis state machine over one vhost-user back-end connection.

Any sequence of messages -- valid and invalid, with real fds (memfds,
eventfds, pipe ends), whole or cut into two recvmsg chunks -- and of engine
failures and disconnects must leave fds, mappings and ring states
consistent.  The harness (tests/harness/vhost_harness.py) checks after every
message: each fd handed over is held or was closed exactly once, the mapped
memory is the protocol's table and the engine's, a running ring has a size,
addresses in the table and a kick, with the fds the protocol holds, and a
ring stopped by GET_VRING_BASE holds no kick.  This machine adds a model of
the ring bases: GET_VRING_BASE answers what the last accepted
SET_VRING_BASE said, or where the engine stopped the ring since.
"""
import logging
import os

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.unit.vhost.vhost_helpers import MiB, UVA0, ring_addr

from tests.harness.vhost_harness import Connection, FdKind
from vfe.vhost.framing import encode_message
from vfe.vhost.messages import (
    NEED_REPLY, VERSION, Config, Inflight, Log, MemoryRegion, MemTable,
    ProtocolFeature, Request, SingleMemRegion, U64, VringAddr, VringFile, VringState,
)
from vfe.virtio.constants import F, bit

REGION = MemoryRegion(0, 16 * MiB, UVA0, 0)
EXTRA = MemoryRegion(16 * MiB, 64 * 1024, UVA0 + 16 * MiB, 0)      # fits a MEMFD_64K
fd_kinds = st.sampled_from(list(FdKind))
# Under REPLY_ACK a refused message is nacked and the connection goes on;
# without NEED_REPLY it is dropped.  Mostly the former, to get deep.
mostly = st.sampled_from([True, True, True, False])
DROPPED = "dropped"          # send(): the back-end dropped the connection
ring_index = st.sampled_from([0, 0, 1, 1, 2, 3, 4])      # 4: beyond every device's rings


class VhostConnection(RuleBasedStateMachine):
    """One device, one front-end after another."""

    @initialize(blk=st.booleans())
    def connect(self, blk):
        logging.disable(logging.CRITICAL)
        self.conn = Connection(blk=blk)
        self.bases: dict[int, int] = {}
        self.stops_seen = 0
        self.session = self.conn.sessions
        self.greeted = 0              # the session the last automatic handshake went to
        self.rehandshake = True

    def teardown(self):
        logging.disable(logging.NOTSET)
        if hasattr(self, "conn"):
            self.conn.close()

    # -- sending

    def send(self, request, payload=b"", kinds=(), need_reply=False, cut=None, flags=None):
        """One message (its fds made here, of ``kinds``), maybe in two chunks;
        returns its REPLY_ACK answer (None: none) or DROPPED."""
        if self.rehandshake and self.greeted != self.conn.sessions:
            # a new connection (the first, or after a drop): the front-end
            # negotiates again first, as QEMU does when it reconnects
            self.greeted = self.conn.sessions
            self.negotiate(all_features=True, log_all=False, memory=True)
        if hasattr(payload, "encode"):
            payload = payload.encode()
        if flags is None:
            flags = VERSION | (NEED_REPLY if need_reply else 0)
        data = encode_message(request, payload, flags)
        fds = [self.conn.fds.make(k) for k in kinds]
        # after raw bytes, a partial message may swallow this one's start
        self.framed = self.conn.framer.at_boundary
        before = self.conn.sessions
        if cut is not None and 0 < cut < len(data):
            ok = self.conn.deliver(data[:cut], fds) and self.conn.deliver(data[cut:])
        else:
            ok = self.conn.deliver(data, fds)
        self._follow_engine()
        if not ok or self.conn.sessions != before:
            return DROPPED
        acks = [U64.decode(r.payload).value for r in self.conn.replies
                if r.request == request and len(r.payload) == 8]
        return acks[-1] if need_reply and acks else None

    def _follow_engine(self):
        """Update the model: a new session starts from scratch; a ring the
        engine stopped continues from where the engine said."""
        if self.conn.sessions != self.session:
            self.session = self.conn.sessions
            self.bases.clear()
            self.stops_seen = len(self.conn.rings.stop_log)
        for index, base in self.conn.rings.stop_log[self.stops_seen:]:
            self.bases[index] = base
        self.stops_seen = len(self.conn.rings.stop_log)

    @property
    def reply_ack(self):
        return self.conn.session.protocol.has_protocol_feature(ProtocolFeature.REPLY_ACK)

    # -- negotiation and memory

    @rule(all_features=st.sampled_from([True, True, False]), log_all=st.booleans(),
          memory=st.sampled_from([True, True, False]))
    def negotiate(self, all_features, log_all, memory):
        """What QEMU sends first (a new connection after a drop needs it again)."""
        spec = self.conn.spec
        pf = spec.protocol_features if all_features else 1 << ProtocolFeature.MQ
        self.send(Request.GET_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, U64(pf))
        self.send(Request.SET_OWNER)
        features = spec.features & ~(0 if log_all else bit(F.VHOST_LOG_ALL))
        self.send(Request.SET_FEATURES, U64(features))
        if memory:
            self.send(Request.SET_MEM_TABLE, MemTable((REGION,)), [FdKind.MEMFD_16M])

    @rule(index=st.sampled_from([0, 1, 1, 2, 3]), num=st.sampled_from([256, 1024, 64]),
          base=st.sampled_from([0, 0, 9]), call=st.booleans(), kick_fd=st.booleans())
    def set_up_ring(self, index, num, base, call, kick_fd):
        """A whole ring the way QEMU sets one up (it starts if memory is there)."""
        index %= self.conn.spec.max_queues
        num = min(num, self.conn.spec.max_queue_size)
        if call:
            self.send(Request.SET_VRING_CALL, U64(VringFile(index, False).value), [FdKind.EVENTFD])
        self.send(Request.SET_VRING_NUM, VringState(index, num))
        self.set_vring_base(index, base)
        self.send(Request.SET_VRING_ADDR, ring_addr(index, num))
        self.send(Request.SET_VRING_KICK, U64(VringFile(index, not kick_fd).value),
                  [FdKind.EVENTFD] if kick_fd else [])

    @rule(kind=st.sampled_from([FdKind.MEMFD_16M, FdKind.MEMFD_16M, FdKind.MEMFD_4K,
                                FdKind.EVENTFD]),
          overlap=st.booleans(), need_reply=mostly, cut=st.none() | st.integers(1, 60))
    def set_mem_table(self, kind, overlap, need_reply, cut):
        regions = (REGION,) + ((MemoryRegion(MiB, MiB, UVA0 + 32 * MiB, 0),) if overlap else ())
        self.send(Request.SET_MEM_TABLE, MemTable(regions), [kind] * len(regions),
                  need_reply=need_reply, cut=cut)

    @rule(kind=st.sampled_from([FdKind.MEMFD_64K, FdKind.MEMFD_4K, FdKind.PIPE_READ]),
          need_reply=mostly)
    def add_mem_reg(self, kind, need_reply):
        self.send(Request.ADD_MEM_REG, SingleMemRegion(EXTRA), [kind], need_reply=need_reply)

    @rule(which=st.sampled_from([EXTRA, REGION]), need_reply=mostly)
    def rem_mem_reg(self, which, need_reply):
        self.send(Request.REM_MEM_REG, SingleMemRegion(which), need_reply=need_reply)

    @rule(kind=st.sampled_from([FdKind.MEMFD_4K, FdKind.EVENTFD]), size=st.sampled_from([4096, 0]))
    def set_log_base(self, kind, size):
        self.send(Request.SET_LOG_BASE, Log(size, 0), [kind])

    # -- rings

    @rule(index=ring_index, num=st.sampled_from([256, 256, 64, 1024, 3, 0, 65536]),
          need_reply=mostly)
    def set_vring_num(self, index, num, need_reply):
        self.send(Request.SET_VRING_NUM, VringState(index, num), need_reply=need_reply)

    @rule(index=ring_index, outside=st.booleans(), log=st.booleans(),
          cut=st.none() | st.integers(1, 51), need_reply=mostly)
    def set_vring_addr(self, index, outside, log, cut, need_reply):
        addr = ring_addr(index, 1024, flags=int(log))
        if outside:
            addr = VringAddr(index, 0, UVA0 + 16 * MiB - 0x100, addr.used_uva, addr.avail_uva, 0)
        self.send(Request.SET_VRING_ADDR, addr, cut=cut, need_reply=need_reply)

    @rule(index=ring_index, value=st.sampled_from([0, 7, 65535, 65536]))
    def set_vring_base(self, index, value):
        need_reply = self.reply_ack
        ack = self.send(Request.SET_VRING_BASE, VringState(index, value), need_reply=need_reply)
        if ack == 0 or (ack is None and not need_reply and self.framed):
            self.bases[index] = value     # acked, or taken silently (no REPLY_ACK)

    @rule(index=ring_index, cut=st.none() | st.integers(1, 19))
    def get_vring_base(self, index, cut):
        """The answer is the model's base: the last accepted SET_VRING_BASE,
        or where the engine stopped the ring (this stop included)."""
        if self.send(Request.GET_VRING_BASE, VringState(index, 0), cut=cut) is DROPPED \
                or not self.framed:
            return
        replies = [r for r in self.conn.replies if r.request == Request.GET_VRING_BASE]
        assert len(replies) == 1, replies
        state = VringState.decode(replies[0].payload)
        assert (state.index, state.num) == (index, self.bases.get(index, 0))

    @precondition(lambda self: self.conn.rings.started)
    @rule(pick=st.integers(0, 3), cut=st.none() | st.integers(1, 19))
    def stop_running_ring(self, pick, cut):
        """GET_VRING_BASE for a ring the engine runs: QEMU's way to stop it."""
        index = sorted(self.conn.rings.started)[pick % len(self.conn.rings.started)]
        self.get_vring_base(index, cut)
        if self.framed:              # (not after garbage that left a partial message)
            assert index not in self.conn.rings.started

    @rule(request=st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                   Request.SET_VRING_ERR]),
          index=ring_index, nofd=st.booleans(), kind=fd_kinds,
          mismatch=st.sampled_from([False, False, True]), need_reply=mostly)
    def set_vring_file(self, request, index, nofd, kind, mismatch, need_reply):
        kinds = [] if nofd != mismatch else [kind]
        self.send(request, U64(VringFile(index, nofd).value), kinds, need_reply=need_reply)

    @rule(index=ring_index, enable=st.sampled_from([0, 1, 1, 2]), need_reply=mostly)
    def set_vring_enable(self, index, enable, need_reply):
        self.send(Request.SET_VRING_ENABLE, VringState(index, enable), need_reply=need_reply)

    @rule()
    def engine_fails_next_start(self):
        self.conn.rings.fail_next_start = True

    # -- blk: inflight

    @precondition(lambda self: self.conn.blk)
    @rule(queues=st.sampled_from([1, 2, 3]), size=st.sampled_from([256, 64, 1000]),
          kind=st.sampled_from([FdKind.MEMFD_64K, FdKind.MEMFD_4K, FdKind.PIPE_WRITE]),
          get_first=st.booleans(), need_reply=mostly)
    def inflight(self, queues, size, kind, get_first, need_reply):
        if get_first:
            self.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, queues, size))
        self.send(Request.SET_INFLIGHT_FD, Inflight(64 * 1024, 0, queues, size), [kind],
                  need_reply=need_reply)

    # -- the rest of the protocol, and garbage

    @rule(request=st.sampled_from([Request.RESET_OWNER, Request.RESET_DEVICE, Request.GET_STATUS,
                                   Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS,
                                   Request.GET_PROTOCOL_FEATURES]))
    def simple(self, request):
        if self.send(request) is not DROPPED and self.framed \
                and request in (Request.RESET_OWNER, Request.RESET_DEVICE):
            self.bases.clear()            # a reset forgets the rings

    @rule(request=st.sampled_from([Request.SET_STATUS, Request.NET_SET_MTU, Request.SEND_RARP]),
          value=st.sampled_from([0, 0xF, 1500, 0x1FF]), need_reply=mostly)
    def set_u64(self, request, value, need_reply):
        self.send(request, U64(value), need_reply=need_reply)

    @rule(offset=st.sampled_from([0, 8, 60]), size=st.sampled_from([4, 60, 0]))
    def get_config(self, offset, size):
        self.send(Request.GET_CONFIG, Config(offset, size, 0, bytes(size)))

    @rule(request=st.integers(0, 50), payload=st.binary(max_size=48),
          kinds=st.lists(fd_kinds, max_size=3), flags=st.integers(0, 15),
          raw=st.none() | st.binary(min_size=1, max_size=40))
    def garbage(self, request, payload, kinds, flags, raw):
        """A message with any id, flags and payload -- or bytes that are no
        message at all (the framer may then wait for more, or fail)."""
        if raw is None:
            self.send(request, payload, kinds, flags=flags)
        else:
            self.conn.deliver(raw, [self.conn.fds.make(k) for k in kinds])
            self._follow_engine()

    @rule(rehandshake=st.sampled_from([True, True, False]))
    def disconnect(self, rehandshake):
        """EOF; the next connection negotiates first unless ``rehandshake``
        is False (then until the next drop, messages meet a bare session)."""
        self.conn.end()              # checks that the session released everything
        self._follow_engine()
        self.rehandshake = rehandshake

    @invariant()
    def consistent(self):
        if hasattr(self, "conn"):
            self.conn.check()
            VhostConnection.reached |= {f"running:{len(self.conn.rings.started)}"}


VhostConnection.reached = set()


VhostConnection.TestCase.settings = settings(
    max_examples=int(os.environ.get("VFE_HYPOTHESIS_EXAMPLES", "200")),
    stateful_step_count=50, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
test_vhost_state_machine = VhostConnection.TestCase


def test_state_machine_reaches_running_rings():
    """The machine must get past negotiation to rings the engine runs (two
    at once), or its invariants about running rings test nothing."""
    VhostConnection.reached = set()
    machine = VhostConnection.TestCase()
    machine.settings = settings(machine.settings, max_examples=60, derandomize=True)
    machine.runTest()
    assert {"running:1", "running:2"} <= VhostConnection.reached

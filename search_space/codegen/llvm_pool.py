"""The persistent worker pool of parallel CPU kernels, as LLVM IR built with llvmlite.

``llvm.parallel_entry`` does not create and join pthreads on every call: the entry calls

    void llm_autotune_pool_run_v1(void (*task)(void *ctx, int64_t share), void *ctx, int64_t n)

which runs ``task(ctx, s)`` for s = 0..n-1, share 0 on the calling thread and the others on
pool workers, and returns once all have finished. A decode step calls hundreds of kernels,
so threads are created once per process and only woken per call.

Where the pool lives (kernel objects only declare the symbol above):

- Tuning, MCJIT: ``install()`` compiles this module once per process into an execution
  engine that is never freed and registers the function with ``llvm.add_symbol``, where
  MCJIT resolves every kernel's declaration (``measure.cpu_kernel.load_object`` calls it).
  All the candidates a worker process loads share one pool. It cannot be a weak or
  linkonce definition inside each kernel object: MCJIT has no logical dylibs and keeps
  such a definition local to each engine even when ``add_symbol`` offers one (one pool, and
  its threads, per candidate), and an engine's code is unmapped when its kernel is
  dropped while its workers sleep in it. (The ``.ll`` sources an export writes therefore
  need this pool, or ``object_file()``, to link.)
- An exported library: ``object_file()`` is linked into the ``.so`` with the kernels; the
  function is hidden there, so all kernels of the library (called through ctypes or the C
  header) share its one pool. No C compiler is involved in either case.

How it behaves:

- Workers are created when a call needs them (the pool grows to the most shares asked so
  far, minus the caller, up to ``MAX_WORKERS``) and never exit. A thread that cannot be
  created leaves its share to the caller, so results never depend on getting threads.
- An idle worker spins on its own cache line for ``SPIN_NS`` (back-to-back kernel calls
  find it awake), then sleeps on a futex. The caller wakes only the workers it uses, with
  a syscall only for those asleep; it waits for them the same way (spin, then futex).
  Past the first ``PAUSE_NS`` a spinning thread calls sched_yield() between checks: where
  the scheduler put a worker on its caller's CPU (a busy machine), pure spinning would keep
  the one it waits for off that CPU until the spin ends.
- One caller at a time: a thread that finds the pool busy (another thread's call, or a
  share that itself calls a parallel kernel) runs all its shares inline, in order.
- fork(): the state lives in an anonymous mapping marked MADV_WIPEONFORK, so a child sees
  an empty, unlocked pool (no workers, which it indeed lacks) and starts its own. Checking
  getpid() would cost a syscall (~90 ns) per call and could not tell a lock held at fork
  time by another thread of the parent. Where the mapping fails (Linux < 4.14), shares run
  inline on the caller.
- Memory ordering: a share's writes are visible to the caller after ``pending`` reaches 0
  (release decrement, acquire load); the job fields are published by the seq_cst bump of
  each worker's ``seq``. Sleep flags and the words they guard are seq_cst on both sides
  (store flag, then load word / update word, then load flag), so a wake-up is never lost.
"""
from __future__ import annotations

import atexit
import platform
import shutil
import tempfile
import threading
from pathlib import Path

import llvmlite.ir as ir

from .ir_loop import counted_loop

POOL_RUN = "llm_autotune_pool_run_v1"  # the one symbol; a change of protocol changes the name
MAX_WORKERS = 255                      # threads besides the caller; further shares run inline
SPIN_NS = 500_000                      # how long an idle worker (or the waiting caller) spins:
# a model's prefill calls its parallel kernels 50-100 us apart, with one-thread kernels
# between; a worker asleep by then costs ~45 us to wake, which tuning (calls back to back)
# never sees. 500 us keeps them awake through a pass (the demo's tuned prefill went from
# 0.81-1.17x to 1.08-1.23x the defaults, RESULTS.md); past PAUSE_NS the spin yields the CPU.
PAUSE_NS = 500                         # of which the first part without yielding the CPU

I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()
PTR = I8.as_pointer()
TASK = ir.FunctionType(VOID, [PTR, I64])  # task(ctx, share)
RUN = ir.FunctionType(VOID, [TASK.as_pointer(), PTR, I64])

# Linux constants (the same on x86-64 and aarch64 but for the syscall number).
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}
_FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE = 128, 129
_CLOCK_MONOTONIC = 1
_PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS, _MADV_WIPEONFORK = 3, 0x22, 18

# The state: a header line, then one 64-byte line per worker, so that the words threads spin
# on never share a cache line. All zero is a valid state: unlocked, no workers.
_HEADER = ir.LiteralStructType([I32, I32, I32, I32, PTR, PTR, ir.ArrayType(I8, 32)])
_LOCK, _NWORKERS, _PENDING, _CALLER_SLEEPING, _TASK, _CTX = range(6)
_SLOT = ir.LiteralStructType([I32, I32, I32, ir.ArrayType(I8, 52)])
_SEQ, _SLEEPING, _INDEX = range(3)  # seq: bumped once per job for this worker; index: its share
_STATE = ir.LiteralStructType([_HEADER, ir.ArrayType(_SLOT, MAX_WORKERS)])
_STATE_BYTES = 64 * (MAX_WORKERS + 1)


def declare_run(module: ir.Module) -> ir.Function:
    """The pool's entry as a declaration in a kernel module."""
    existing = module.globals.get(POOL_RUN)
    if existing is not None:
        return existing
    fn = ir.Function(module, RUN, name=POOL_RUN)
    fn.attributes.add("nounwind")
    return fn


def _i32(value: int) -> ir.Constant:
    return ir.Constant(I32, value)


def _i64(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


class _Emitter:
    """Builds the pool module: one small function per step, each with its own builder."""

    def __init__(self, machine: str, visibility: str):
        machine = machine.lower()
        if machine not in _SYS_FUTEX:
            raise NotImplementedError(f"the kernel thread pool supports x86-64 and aarch64 Linux, not {machine}")
        self.machine = machine
        self.m = ir.Module(name="llm_autotune_pool")
        m = self.m
        self.syscall = ir.Function(m, ir.FunctionType(I64, [I64], var_arg=True), "syscall")
        self.clock_gettime = ir.Function(m, ir.FunctionType(I32, [I32, PTR]), "clock_gettime")
        self.mmap = ir.Function(m, ir.FunctionType(PTR, [PTR, I64, I32, I32, I32, I64]), "mmap")
        self.madvise = ir.Function(m, ir.FunctionType(I32, [PTR, I64, I32]), "madvise")
        self.munmap = ir.Function(m, ir.FunctionType(I32, [PTR, I64]), "munmap")
        self.pthread_create = ir.Function(m, ir.FunctionType(I32, [I64.as_pointer(), PTR, PTR, PTR]),
                                          "pthread_create")
        self.pthread_detach = ir.Function(m, ir.FunctionType(I32, [I64]), "pthread_detach")
        self.sched_yield = ir.Function(m, ir.FunctionType(I32, []), "sched_yield")
        self.state = ir.GlobalVariable(m, PTR, "pool.state")  # null, the mapping, or _no_pool()
        self.state.linkage = "internal"
        self.state.initializer = ir.Constant(PTR, None)
        self.state.align = 8
        self.pause = self._pause()
        self.now_ns = self._now_ns()
        self.futex_wait, self.futex_wake = self._futex()
        self.wait_while = self._wait_while()
        self.get_state = self._get_state()
        self.worker = self._worker()
        self.run = self._run(visibility)

    # -- helpers ----------------------------------------------------------------------
    def _define(self, name: str, ftype: ir.FunctionType) -> tuple[ir.Function, ir.IRBuilder]:
        fn = ir.Function(self.m, ftype, name=name)
        fn.linkage = "internal"
        fn.attributes.add("nounwind")
        return fn, ir.IRBuilder(fn.append_basic_block("entry"))

    @staticmethod
    def _field(b: ir.IRBuilder, state, *path: int):
        """Address of a header field (one index) or of a worker slot's field (slot, field)."""
        if len(path) == 1:
            return b.gep(state, [_i32(0), _i32(0), _i32(path[0])], inbounds=True)
        slot, field = path
        slot = slot if isinstance(slot, ir.Value) else _i64(slot)
        return b.gep(state, [_i32(0), _i32(1), slot, _i32(field)], inbounds=True)

    @staticmethod
    def _no_pool() -> ir.Constant:
        return ir.Constant(I64, 1).inttoptr(PTR)  # the mapping failed: run every share inline

    # -- pieces -----------------------------------------------------------------------
    def _pause(self) -> ir.Function:
        """One spin-wait hint: x86 ``pause``, aarch64 ``yield``."""
        fn, b = self._define("pool.pause", ir.FunctionType(VOID, []))
        if self.machine in ("x86_64", "amd64"):
            b.call(ir.Function(self.m, ir.FunctionType(VOID, []), "llvm.x86.sse2.pause"), [])
        else:
            b.call(ir.Function(self.m, ir.FunctionType(VOID, [I32]), "llvm.aarch64.hint"), [_i32(1)])
        b.ret_void()
        return fn

    def _now_ns(self) -> ir.Function:
        fn, b = self._define("pool.now_ns", ir.FunctionType(I64, []))
        ts = b.alloca(ir.LiteralStructType([I64, I64]), name="ts")
        b.call(self.clock_gettime, [_i32(_CLOCK_MONOTONIC), b.bitcast(ts, PTR)])
        sec = b.load(b.gep(ts, [_i32(0), _i32(0)], inbounds=True))
        nsec = b.load(b.gep(ts, [_i32(0), _i32(1)], inbounds=True))
        b.ret(b.add(b.mul(sec, _i64(1_000_000_000)), nsec))
        return fn

    def _futex(self) -> tuple[ir.Function, ir.Function]:
        number = _i64(_SYS_FUTEX[self.machine])
        wait, b = self._define("pool.futex_wait", ir.FunctionType(VOID, [I32.as_pointer(), I32]))
        word, value = wait.args
        # returns at once when *word != value; EINTR and spurious wake-ups: callers loop
        b.call(self.syscall, [number, word, _i64(_FUTEX_WAIT_PRIVATE), b.zext(value, I64), ir.Constant(PTR, None)])
        b.ret_void()
        wake, b = self._define("pool.futex_wake", ir.FunctionType(VOID, [I32.as_pointer()]))
        b.call(self.syscall, [number, wake.args[0], _i64(_FUTEX_WAKE_PRIVATE), _i64(1)])  # one waiter per word
        b.ret_void()
        return wait, wake

    def _wait_while(self) -> ir.Function:
        """``wait_while(word, value, sleeping)``: return once *word != value (acquire); spin
        for SPIN_NS first (yielding past PAUSE_NS), then sleep with *sleeping = 1 so that the
        writer knows to wake us."""
        fn, b = self._define("pool.wait_while", ir.FunctionType(VOID, [I32.as_pointer(), I32, I32.as_pointer()]))
        word, value, sleeping = fn.args
        spin, pausing, polite, block, check, sleep, woke, done = (fn.append_basic_block(n) for n in (
            "spin", "pausing", "polite", "block", "check", "sleep", "woke", "done"))
        start = b.call(self.now_ns, [])
        b.branch(spin)
        b.position_at_end(spin)
        changed = b.icmp_unsigned("!=", b.load_atomic(word, "acquire", 4), value)
        b.cbranch(changed, done, pausing)
        b.position_at_end(pausing)
        b.call(self.pause, [])
        spun = b.sub(b.call(self.now_ns, []), start)
        b.cbranch(b.icmp_signed("<", spun, _i64(SPIN_NS)), polite, block)
        b.position_at_end(polite)
        with b.if_then(b.icmp_signed(">=", spun, _i64(PAUSE_NS))):
            b.call(self.sched_yield, [])
        b.branch(spin)
        b.position_at_end(block)
        b.store_atomic(_i32(1), sleeping, "seq_cst", 4)
        b.branch(check)
        b.position_at_end(check)
        b.cbranch(b.icmp_unsigned("!=", b.load_atomic(word, "seq_cst", 4), value), woke, sleep)
        b.position_at_end(sleep)
        b.call(self.futex_wait, [word, value])
        b.branch(check)
        b.position_at_end(woke)
        b.store_atomic(_i32(0), sleeping, "release", 4)
        b.branch(done)
        b.position_at_end(done)
        b.ret_void()
        return fn

    def _get_state(self) -> ir.Function:
        """The state mapping, created by the first call (a racing creator unmaps its own)."""
        fn, b = self._define("pool.get_state", ir.FunctionType(PTR, []))
        known = b.load_atomic(self.state, "acquire", 8)
        create, done = fn.append_basic_block("create"), fn.append_basic_block("done")
        b.cbranch(b.icmp_unsigned("!=", known, ir.Constant(PTR, None)), done, create)
        b.position_at_end(done)
        result = b.phi(PTR)
        result.add_incoming(known, fn.entry_basic_block)
        b.ret(result)

        b.position_at_end(create)
        size = _i64(_STATE_BYTES)
        mem = b.call(self.mmap, [ir.Constant(PTR, None), size, _i32(_PROT_READ_WRITE), _i32(_MAP_PRIVATE_ANONYMOUS),
                                 _i32(-1), _i64(0)])
        mapped = b.icmp_unsigned("!=", b.ptrtoint(mem, I64), _i64(-1))  # MAP_FAILED
        advise, publish = fn.append_basic_block("advise"), fn.append_basic_block("publish")
        before = b.block
        b.cbranch(mapped, advise, publish)
        b.position_at_end(advise)
        wiped = b.icmp_signed("==", b.call(self.madvise, [mem, size, _i32(_MADV_WIPEONFORK)]), _i32(0))
        unusable = fn.append_basic_block("unusable")
        b.cbranch(wiped, publish, unusable)
        b.position_at_end(unusable)
        b.call(self.munmap, [mem, size])
        b.branch(publish)

        b.position_at_end(publish)
        mine = b.phi(PTR)
        mine.add_incoming(self._no_pool(), before)
        mine.add_incoming(mem, advise)
        mine.add_incoming(self._no_pool(), unusable)
        pair = b.cmpxchg(self.state, ir.Constant(PTR, None), mine, "acq_rel", "acquire")
        won = b.extract_value(pair, 1)
        lost, back = fn.append_basic_block("lost"), b.block
        b.cbranch(won, done, lost)
        result.add_incoming(mine, back)
        b.position_at_end(lost)
        with b.if_then(b.icmp_unsigned("!=", mine, self._no_pool())):
            b.call(self.munmap, [mine, size])
        result.add_incoming(b.extract_value(pair, 0), b.block)
        b.branch(done)
        return fn

    def _worker(self) -> ir.Function:
        """A worker thread: wait for its seq to move, run its share, count it done; forever."""
        fn, b = self._define("pool.worker", ir.FunctionType(PTR, [PTR]))
        state = b.bitcast(b.load_atomic(self.state, "acquire", 8), _STATE.as_pointer())
        slot = b.bitcast(fn.args[0], _SLOT.as_pointer())
        seq = b.gep(slot, [_i32(0), _i32(_SEQ)], inbounds=True)
        sleeping = b.gep(slot, [_i32(0), _i32(_SLEEPING)], inbounds=True)
        index = b.zext(b.load(b.gep(slot, [_i32(0), _i32(_INDEX)], inbounds=True)), I64)
        pending = self._field(b, state, _PENDING)
        entry = b.block
        loop = fn.append_basic_block("loop")
        b.branch(loop)
        b.position_at_end(loop)
        seen = b.phi(I32, name="seen")
        seen.add_incoming(_i32(0), entry)  # the creator set seq = 0 before pthread_create
        b.call(self.wait_while, [seq, seen, sleeping])
        now = b.load_atomic(seq, "acquire", 4)
        task = b.bitcast(b.load(self._field(b, state, _TASK)), TASK.as_pointer())
        ctx = b.load(self._field(b, state, _CTX))
        b.call(task, [ctx, index])
        # nothing of the job (ctx is on the caller's stack) may be touched after this
        last = b.icmp_unsigned("==", b.atomic_rmw("sub", pending, _i32(1), "seq_cst"), _i32(1))
        with b.if_then(last):
            asleep = b.load_atomic(self._field(b, state, _CALLER_SLEEPING), "seq_cst", 4)
            with b.if_then(b.icmp_unsigned("!=", asleep, _i32(0))):
                b.call(self.futex_wake, [pending])
        seen.add_incoming(now, b.block)
        b.branch(loop)
        return fn

    def _run(self, visibility: str) -> ir.Function:
        fn = ir.Function(self.m, RUN, name=POOL_RUN)
        fn.linkage = visibility  # "hidden" in a shared library: one pool per library
        fn.attributes.add("nounwind")
        task, ctx, n = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        tid = b.alloca(I64, name="tid")
        inline, try_lock, locked = (fn.append_basic_block(x) for x in ("inline", "try_lock", "locked"))
        check_state = fn.append_basic_block("check_state")
        b.cbranch(b.icmp_signed(">", n, _i64(1)), check_state, inline)

        b.position_at_end(inline)  # no pool, or it is busy: every share on this thread, in order
        with counted_loop(b, _i64(0), n, name="s") as s:
            b.call(task, [ctx, s])
        b.ret_void()

        b.position_at_end(check_state)
        raw = b.call(self.get_state, [])
        b.cbranch(b.icmp_unsigned("!=", raw, self._no_pool()), try_lock, inline)
        b.position_at_end(try_lock)
        state = b.bitcast(raw, _STATE.as_pointer())
        pair = b.cmpxchg(self._field(b, state, _LOCK), _i32(0), _i32(1), "acquire", "monotonic")
        b.cbranch(b.extract_value(pair, 1), locked, inline)

        # Grow the pool to the shares this call can hand out (only the lock holder does).
        b.position_at_end(locked)
        want = b.sub(n, _i64(1))
        want = b.select(b.icmp_signed("<", want, _i64(MAX_WORKERS)), want, _i64(MAX_WORKERS))
        started = b.zext(b.load(self._field(b, state, _NWORKERS)), I64)
        head, create, created, grown = (fn.append_basic_block(x) for x in ("grow", "create", "created", "grown"))
        b.branch(head)
        b.position_at_end(head)
        count = b.phi(I64, name="workers")
        count.add_incoming(started, locked)
        b.cbranch(b.icmp_signed("<", count, want), create, grown)
        b.position_at_end(create)
        b.store(_i32(0), self._field(b, state, count, _SEQ))
        b.store(_i32(0), self._field(b, state, count, _SLEEPING))
        b.store(b.trunc(b.add(count, _i64(1)), I32), self._field(b, state, count, _INDEX))
        slot = b.bitcast(b.gep(state, [_i32(0), _i32(1), count], inbounds=True), PTR)
        rc = b.call(self.pthread_create, [tid, ir.Constant(PTR, None), b.bitcast(self.worker, PTR), slot])
        b.cbranch(b.icmp_signed("==", rc, _i32(0)), created, grown)  # no thread: its share stays here
        b.position_at_end(created)
        b.call(self.pthread_detach, [b.load(tid)])
        count.add_incoming(b.add(count, _i64(1)), created)
        b.branch(head)

        b.position_at_end(grown)
        b.store(b.trunc(count, I32), self._field(b, state, _NWORKERS))
        used = b.select(b.icmp_signed("<", count, want), count, want)  # workers 1..used take shares 1..used
        b.store(b.bitcast(task, PTR), self._field(b, state, _TASK))
        b.store(ctx, self._field(b, state, _CTX))
        pending = self._field(b, state, _PENDING)
        b.store_atomic(b.trunc(used, I32), pending, "release", 4)
        with counted_loop(b, _i64(0), used, name="w") as w:
            b.atomic_rmw("add", self._field(b, state, w, _SEQ), _i32(1), "seq_cst")
            asleep = b.load_atomic(self._field(b, state, w, _SLEEPING), "seq_cst", 4)
            with b.if_then(b.icmp_unsigned("!=", asleep, _i32(0))):
                b.call(self.futex_wake, [self._field(b, state, w, _SEQ)])
        b.call(task, [ctx, _i64(0)])
        with counted_loop(b, b.add(used, _i64(1)), n, name="extra") as s:  # shares no worker could take
            b.call(task, [ctx, s])

        wait, done, sleep = (fn.append_basic_block(x) for x in ("wait", "done", "sleep"))
        b.branch(wait)
        b.position_at_end(wait)
        left = b.load_atomic(pending, "acquire", 4)
        b.cbranch(b.icmp_unsigned("==", left, _i32(0)), done, sleep)
        b.position_at_end(sleep)
        b.call(self.wait_while, [pending, left, self._field(b, state, _CALLER_SLEEPING)])
        b.branch(wait)
        b.position_at_end(done)
        b.store_atomic(_i32(0), self._field(b, state, _LOCK), "release", 4)
        b.ret_void()
        return fn


# MCJIT maps an object's code and its constants separately, and in a busy process the two
# mappings can land more than 2 GiB apart; x86-64's small code model reaches constants through
# 32-bit offsets, so loading such an object aborts on a relocation overflow (reproduced with
# a few GiB mapped between one-page holes). The large model addresses them with 64 bits.
CODE_MODEL = "large" if platform.machine().lower() in ("x86_64", "amd64") else "default"


def pool_module(machine: str | None = None, visibility: str = "hidden") -> ir.Module:
    """The pool as an ``ir.Module`` for this machine's architecture (or ``machine``)."""
    return _Emitter(machine or platform.machine(), visibility).m


def _compile(llvm, visibility: str):
    """(module, target machine): the pool parsed, verified and optimised for this process."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
        opt=2, reloc="pic", codemodel=CODE_MODEL)
    module = llvm.parse_assembly(str(pool_module(visibility=visibility)))
    module.triple = llvm.get_process_triple()
    module.data_layout = str(tm.target_data)
    module.verify()
    builder = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2))
    builder.getModulePassManager().run(module, builder)
    module.verify()
    return module, tm


_lock = threading.Lock()
_engine = None       # the MCJIT engine holding this process's pool: never freed
_object: Path | None = None


def install() -> int:
    """Make ``POOL_RUN`` resolvable by MCJIT in this process (once); returns its address."""
    global _engine
    import llvmlite.binding as llvm

    with _lock:
        if _engine is None:
            module, tm = _compile(llvm, visibility="")  # the engine takes ownership of tm
            engine = llvm.create_mcjit_compiler(module, tm)
            engine.finalize_object()
            address = engine.get_function_address(POOL_RUN)
            if not address:
                raise RuntimeError(f"{POOL_RUN} not found in the compiled pool")
            llvm.add_symbol(POOL_RUN, address)
            _engine = engine
        return _engine.get_function_address(POOL_RUN)


def object_bytes() -> bytes:
    """The pool as object code for this machine, ``POOL_RUN`` hidden: to link into a library."""
    import llvmlite.binding as llvm

    module, tm = _compile(llvm, visibility="hidden")
    return tm.emit_object(module)


def object_file() -> Path:
    """``object_bytes()`` in a file that lasts as long as this process: for a link command."""
    global _object
    with _lock:
        if _object is None or not _object.is_file():
            folder = Path(tempfile.mkdtemp(prefix="llm-autotune-pool-"))
            atexit.register(shutil.rmtree, folder, True)
            path = folder / "llm_autotune_pool.o"
            path.write_bytes(object_bytes())
            _object = path
        return _object

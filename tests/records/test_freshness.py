"""A record's code identity against what this version builds for its config: fresh, stale
(another digest, another compiler, a config the template no longer has), unknown (no
identity kept), superseded (measured again on today's code)."""
from __future__ import annotations

import pytest

from export import TunedKernels
from measure import MeasureError, MeasureResult
from measure.builder import artifact_flags, compiler_identity
from records import CodeCheck, Record, StaleRecordsWarning, chosen, select_best, stale_configs
from records.freshness import FRESH, STALE, UNKNOWN
from search_space import Task, get_template

TASK = Task.make("add", {"M": 4, "N": 64})
OTHER_CODE = "0" * 32


def record(host, seconds: float, digest: str | None = "today", compiler: str | None = "today", **values) -> Record:
    """A verified record of the add template's default config (changed by ``values``) taking
    ``seconds``; its code identity is today's unless ``digest``/``compiler`` say otherwise
    (None: not kept)."""
    template = get_template("add", "cpu")
    config = dict(template.default(TASK, host).as_dict(), **values)
    stats = {}
    if digest is not None:
        rendered = template.render(TASK, template.space(TASK, host).from_values(config), host)
        stats["digest"] = rendered.digest(artifact_flags(host)) if digest == "today" else digest
    if compiler is not None:
        stats["compiler"] = compiler_identity(host) if compiler == "today" else compiler
    return Record(TASK, host, config, -1, MeasureResult((seconds,), stats=stats))


def test_a_record_is_fresh_stale_or_unknown(host):
    check = CodeCheck()
    assert check.status(record(host, 1.0)) == (FRESH, "")
    assert check.status(record(host, 1.0, compiler=None)) == (FRESH, "")  # from before records kept it
    assert check.status(record(host, 1.0, digest=None)) == (UNKNOWN, "")
    assert check.status(record(host, 1.0, digest=OTHER_CODE)) == (
        STALE, "today's template renders their config to other code")
    status, reason = check.status(record(host, 1.0, compiler="LLVM 1.0.0 (llvmlite 0.1.0)"))
    assert status == STALE and reason == f"built by LLVM 1.0.0 (llvmlite 0.1.0), this machine has {compiler_identity(host)}"
    gone = record(host, 1.0)
    gone = Record(gone.task, gone.target, dict(gone.config, vec=3), -1, gone.result)  # no such vec any more
    status, reason = check.status(gone)
    assert status == STALE and reason.startswith("today's template does not have their config") and "vec" in reason
    assert not check.buildable(gone) and check.buildable(record(host, 1.0, digest=OTHER_CODE))


def test_the_fastest_record_that_is_not_stale_is_used_and_the_stale_ones_are_counted(host):
    stale = record(host, 0.5, digest=OTHER_CODE, unroll=2)
    fresh = record(host, 2.0, unroll=4)
    (choice,) = select_best([stale, fresh])
    assert choice.record is fresh and choice.stale == 1 and not choice.uses_stale
    assert choice.note() == (f"{TASK.key} on {host.key}: 1 faster stale record(s) skipped "
                             "(today's template renders their config to other code)")
    (choice,) = select_best([stale, fresh], allow_stale=True)
    assert choice.record is stale and choice.uses_stale and "using a stale record" in choice.note()

    unknown = record(host, 1.0, digest=None, unroll=1)  # nothing says it is stale: used as before
    assert chosen(select_best([stale, fresh, unknown])) == {(TASK.key, host.key): unknown}

    (choice,) = select_best([stale])
    assert choice.record is None and choice.note().endswith("all 1 verified record(s) are stale "
                                                            "(today's template renders their config to other code); "
                                                            "none is used")
    assert chosen([choice]) == {}


def test_a_config_today_s_template_lacks_is_never_used(host):
    gone = record(host, 0.1)
    gone = Record(gone.task, gone.target, dict(gone.config, vec=3), -1, gone.result)
    fresh = record(host, 2.0)
    (choice,) = select_best([gone, fresh], allow_stale=True)
    assert choice.record is fresh and choice.stale == 1 and not choice.uses_stale
    assert stale_configs([gone, fresh], TASK, host) == ([], 1)
    # the note says so, and the CLI offers no --remeasure-stale for it
    assert choice.note().endswith("; none of them is in today's space of add, so none can be measured again")
    assert not choice.remeasurable and not choice.warning().remeasurable
    (choice,) = select_best([gone, record(host, 0.5, digest=OTHER_CODE, unroll=4), fresh])
    assert choice.stale == 2 and choice.remeasurable and choice.warning().remeasurable
    assert choice.note().endswith("; 1 of them are not in today's space of add and cannot be measured again")


def test_a_stale_record_measured_again_is_superseded(host):
    old = record(host, 0.5, digest=OTHER_CODE, unroll=2)
    other = record(host, 0.7, digest=OTHER_CODE, unroll=4)
    assert stale_configs([old, other], TASK, host) == ([old, other], 0)
    again = record(host, 3.0, unroll=2)  # old's config on today's code
    (choice,) = select_best([old, other, again])
    assert choice.record is again and choice.stale == 1  # only ``other`` still waits for a measurement
    assert stale_configs([old, other, again], TASK, host) == ([other], 0)
    # measured again and failed: a build that failed keeps no identity (measured again next
    # time), a run that failed keeps today's (the config is settled)
    unbuilt = Record(TASK, host, other.config, -1, MeasureResult.failed(MeasureError.COMPILE_ERROR, "broken"))
    assert stale_configs([old, other, again, unbuilt], TASK, host) == ([other], 0)
    wrong = record(host, 1.0, unroll=4)
    wrong = Record(TASK, host, wrong.config, -1, MeasureResult.failed(MeasureError.WRONG_ANSWER, "wrong",
                                                                      stats=wrong.result.stats))
    assert stale_configs([old, other, again, wrong], TASK, host) == ([], 0)


def test_tuned_kernels_skip_stale_records_with_a_warning(host):
    stale = record(host, 0.5, digest=OTHER_CODE, unroll=2)
    fresh = record(host, 2.0, unroll=4)
    with pytest.warns(StaleRecordsWarning, match="1 faster stale record"):
        kernels = TunedKernels([stale, fresh], host)
    assert kernels.record_for(TASK) is fresh
    with pytest.warns(StaleRecordsWarning, match="using a stale record"):
        assert TunedKernels([stale, fresh], host, allow_stale=True).record_for(TASK) is stale

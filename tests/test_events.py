"""`train.train.events_at`: when the loop logs, evaluates, saves and stops.

The reference enumerates a whole run from the rules as the config documents them (sets of
steps: epoch ends, multiples of eval_every_steps, the last step, ...), independently of
`events_at`'s per-step arithmetic, and the loop must agree with it at every step.
"""

from __future__ import annotations

import itertools

import pytest

from train.train import Cadence, Events, events_at, steps_in_dispatch


def reference_run(cadence: Cadence, signal_at: int | None = None) -> dict[int, Events]:
    """The events after each step of a run from step 1 until it stops, by enumeration.

    `signal_at`: the step after which a SIGTERM is noticed (None: never).
    """
    total = cadence.total_steps
    epoch_ends = set(range(cadence.steps_per_epoch, total + 1, cadence.steps_per_epoch))
    periodic = (
        set(range(cadence.eval_every_steps, total + 1, cadence.eval_every_steps))
        if cadence.eval_every_steps
        else set()
    )
    evaluations = epoch_ends | periodic | {total}
    logs = set(range(cadence.log_every_steps, total + 1, cadence.log_every_steps)) | evaluations
    stop_requests = {  # a signal names the stop even at stop_after_steps (it comes last)
        step: name
        for step, name in ((cadence.stop_after_steps, "stop_after_steps"), (signal_at, "SIGTERM"))
        if step is not None
    }
    last = min([total, *(step for step in stop_requests if step <= total)])
    run = {}
    for step in range(1, last + 1):
        stopped_by = stop_requests.get(step)
        run[step] = Events(
            log=step in logs,
            evaluate=step in evaluations,
            save=step in evaluations or stopped_by is not None,
            stopped_by=stopped_by,
            done=step == last,
        )
    return run


def run_of(cadence: Cadence, signal_at: int | None = None) -> dict[int, Events]:
    """The events `events_at` gives at each step, until the first that ends the loop."""
    run = {}
    for step in itertools.count(1):
        signal_name = "SIGTERM" if signal_at is not None and step >= signal_at else None
        run[step] = events_at(step, cadence, signal_name)
        if run[step].done:
            return run
        assert step < 10 * cadence.total_steps, "the loop never ends"
    raise AssertionError("unreachable")


SMALL_CADENCES = [
    Cadence(spe, total, log_every, eval_every, stop)
    for spe, total, log_every, eval_every, stop in itertools.product(
        (1, 2, 3, 4), range(1, 11), (1, 2, 3), (0, 1, 2, 3, 5), (None, 1, 3, 4, 7, 12)
    )
]


def test_every_small_cadence_agrees_with_the_enumeration():
    for cadence in SMALL_CADENCES:
        assert run_of(cadence) == reference_run(cadence), cadence


@pytest.mark.parametrize("signal_at", [1, 2, 5, 9, 10])
def test_a_signal_stops_after_its_step_and_names_itself(signal_at):
    for cadence in SMALL_CADENCES:
        if cadence.total_steps == 10:
            assert run_of(cadence, signal_at) == reference_run(cadence, signal_at), cadence


def test_written_out_run():
    """3 epochs of 4 steps, stopped at step 10: log every 3, evaluate every 3 and at epoch ends."""
    run = run_of(Cadence(4, 12, 3, 3, 10))
    assert sorted(run) == list(range(1, 11))
    assert [s for s, e in run.items() if e.log] == [3, 4, 6, 8, 9]
    assert [s for s, e in run.items() if e.evaluate] == [3, 4, 6, 8, 9]
    assert [s for s, e in run.items() if e.save] == [3, 4, 6, 8, 9, 10]
    assert [s for s, e in run.items() if e.stopped_by] == [10]
    assert run[10].stopped_by == "stop_after_steps" and run[10].done


def test_written_out_run_whose_last_step_ends_no_epoch():
    """num_train_steps=7 with 3 steps per epoch, logged every 2: the last step evaluates."""
    run = run_of(Cadence(3, 7, 2, 0, None))
    assert sorted(run) == list(range(1, 8))
    assert [s for s, e in run.items() if e.log] == [2, 3, 4, 6, 7]
    assert [s for s, e in run.items() if e.save] == [3, 6, 7]
    assert [s for s, e in run.items() if e.evaluate] == [3, 6, 7]
    assert [s for s, e in run.items() if e.done] == [7]
    assert all(e.stopped_by is None for e in run.values())


def test_a_stop_at_the_last_step_is_named_and_evaluates():
    events = events_at(6, Cadence(3, 6, 5, 0, 6))
    assert events == Events(
        log=True, evaluate=True, save=True, stopped_by="stop_after_steps", done=True
    )
    events = events_at(6, Cadence(4, 8, 5, 0, None), "SIGINT")
    assert events == Events(log=False, evaluate=False, save=True, stopped_by="SIGINT", done=True)


def dispatches_of(cadence: Cadence, steps_per_dispatch: int, start: int = 0) -> list[int]:
    """The sizes of the loop's dispatches from step `start` to the end, per `steps_in_dispatch`."""
    sizes, step = [], start
    while step < cadence.total_steps:
        sizes.append(steps_in_dispatch(step, cadence, steps_per_dispatch))
        step += sizes[-1]
    return sizes


# Longer logging periods too: with logs every 1-3 steps a dispatch of 4 never fits.
DISPATCH_CADENCES = SMALL_CADENCES + [
    Cadence(spe, total, log_every, eval_every, stop)
    for spe, total, log_every, eval_every, stop in itertools.product(
        (5, 8, 100), (7, 16, 23), (4, 5, 50), (0, 6), (None, 9)
    )
]


@pytest.mark.parametrize("steps_per_dispatch", [1, 2, 3, 4])
def test_dispatches_end_at_every_event_and_are_as_long_as_they_may_be(steps_per_dispatch):
    longer_dispatches = 0
    for cadence in DISPATCH_CADENCES:
        # The steps after which the loop acts (logs, saves or stops), from the enumeration of
        # the whole run, and the requested stop (a resumed run goes on after it).
        whole_run = reference_run(cadence._replace(stop_after_steps=None))
        acts = {step for step, events in whole_run.items() if events.log or events.save}
        acts |= {cadence.total_steps, cadence.stop_after_steps} - {None}
        for start in range(cadence.total_steps):
            sizes = dispatches_of(cadence, steps_per_dispatch, start)
            ends = set(itertools.accumulate(sizes, initial=start)) - {start}
            due = {a for a in acts if start < a <= cadence.total_steps}
            assert ends.issuperset(due), (cadence, start, sizes)
            assert sum(sizes) == cadence.total_steps - start
            step = start
            for size in sizes:
                assert size in (1, steps_per_dispatch)
                if size == 1 and steps_per_dispatch > 1:  # only where a longer one may not run
                    window = range(step + 1, step + steps_per_dispatch)
                    assert step + steps_per_dispatch > cadence.total_steps or any(
                        s in acts for s in window
                    ), (cadence, start, sizes)
                step += size
            longer_dispatches += sizes.count(steps_per_dispatch) if steps_per_dispatch > 1 else 0
    assert steps_per_dispatch == 1 or longer_dispatches > 1000

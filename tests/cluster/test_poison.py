"""The poison rule (cluster/poison.py) without Ray: hand-worked sequences of deaths."""

from __future__ import annotations

import pytest

from mlaserve.cluster.poison import Suspicion


def test_a_request_dying_at_its_first_step_everywhere_fails_after_one_plus_strikes_deaths():
    s = Suspicion(strikes_to_fail=3)
    assert not s.on_trial
    # Its first attempt dies before a token: a suspect, no strike yet (not isolated from other
    # fresh requests).
    assert s.lost("w0", proven=False, trial=False) is False and s.on_trial and s.strikes == 0
    assert s.lost("w1", proven=False, trial=True) is False and s.strikes == 1
    assert s.lost("w0", proven=False, trial=True) is False and s.strikes == 2
    assert s.lost("w1", proven=False, trial=True) is True
    assert (s.losses, s.strikes) == (4, 3)
    msg = s.describe("r1")
    assert "'r1'" in msg and "suspected cause of 4 worker deaths" in msg and "w0, w1, w0, w1" in msg


def test_a_request_dying_at_a_fixed_token_costs_one_death_more():
    s = Suspicion(strikes_to_fail=2)
    # First attempt produced tokens, then its worker died at token k: a bystander's loss.
    assert s.lost("w0", proven=True, trial=False) is False and not s.on_trial
    # Resumed at token k, it dies before producing one: now a suspect.
    assert s.lost("w1", proven=False, trial=False) is False and s.on_trial
    assert s.lost("w0", proven=False, trial=True) is False
    assert s.lost("w1", proven=False, trial=True) is True and s.losses == 4


def test_a_bystander_is_never_failed_for_deaths_after_it_produced_tokens():
    s = Suspicion(strikes_to_fail=1)
    for i in range(50):
        assert s.lost(f"w{i % 2}", proven=True, trial=False) is False
    assert s.losses == 50 and s.strikes == 0 and not s.on_trial


def test_a_trial_that_produces_a_token_clears_the_suspect_and_its_strikes():
    s = Suspicion(strikes_to_fail=2)
    s.lost("w0", proven=False, trial=False)
    assert s.lost("w1", proven=False, trial=True) is False and s.strikes == 1  # one unlucky trial
    s.proven()  # the next trial produced its first token
    assert not s.on_trial and s.strikes == 0
    # Suspected again later: it takes poison_strikes trials in a row again.
    assert s.lost("w0", proven=False, trial=False) is False and s.on_trial
    assert s.lost("w1", proven=False, trial=True) is False
    assert s.lost("w0", proven=False, trial=True) is True and s.losses == 5


def test_strikes_to_fail_is_validated():
    with pytest.raises(ValueError, match="strikes_to_fail"):
        Suspicion(strikes_to_fail=0)

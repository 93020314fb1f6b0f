"""Request errors keep their field across pickling, as Ray ships them between processes."""

from __future__ import annotations

import pickle

import pytest

from mlaserve.cluster.errors import InvalidRequest
from mlaserve.worker.errors import RequestError


@pytest.mark.parametrize("cls", [InvalidRequest, RequestError])
def test_request_errors_round_trip_through_pickle(cls):
    err = pickle.loads(pickle.dumps(cls("sampling.top_k", "must be an integer >= 0")))
    assert type(err) is cls
    assert err.field == "sampling.top_k"
    assert err.message == "must be an integer >= 0"
    assert str(err) == "sampling.top_k: must be an integer >= 0"

"""views/live_view.choose_refresh: where the page is drawn sets how often a running comparison refreshes it."""
import pytest

from nanospec_core.errors import NanoSpecError
from nanospec_core.views.live_view import LIVE, SHARED, choose_refresh, usable_cores


def test_a_viewer_on_the_machine_that_decodes_on_every_core_gets_fewer_refreshes():
    assert choose_refresh("127.0.0.1", cores=2, threads=2) == SHARED
    assert choose_refresh("::1", cores=4, threads=4) == SHARED
    assert SHARED.texts_s > LIVE.texts_s and SHARED.charts_s > LIVE.charts_s and SHARED.note


@pytest.mark.parametrize("host, cores, threads", [("10.0.0.7", 2, 2),  # a visitor's own machine draws the page
                                                   ("127.0.0.1", 16, 8),  # cores to spare for the browser
                                                   (None, 2, 2)])  # no request (a direct call, a test)
def test_everyone_else_gets_the_live_refresh(host, cores, threads):
    assert choose_refresh(host, cores, threads) == LIVE


def test_the_setting_wins_and_a_bad_one_is_a_clear_error():
    chosen = choose_refresh("127.0.0.1", 2, 2, "0.5,3")
    assert (chosen.texts_s, chosen.charts_s) == (0.5, 3.0) and "NANOSPEC_REFRESH" in chosen.note
    for bad in ("fast", "1", "1,2,3", "a,b"):
        with pytest.raises(NanoSpecError, match="TEXTS_S,CHARTS_S"):
            choose_refresh(None, 2, 2, bad)


def test_usable_cores_works_where_the_os_has_no_affinity_call(monkeypatch):
    import os

    assert usable_cores() >= 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert usable_cores() == (os.cpu_count() or 1)

"""Ages that are lower bounds (the goroutine existed before tracing) are marked in
the control plane's text (">= ") and JSON (a boolean); exact ones are not."""

from __future__ import annotations

from goleash.api.goleash.v1 import goleash_service_pb2 as q
from goleash.api.goleash.v1 import types_pb2 as t
from goleash.control import views


def group(lower_bound: bool) -> q.OrphanGroup:
    return q.OrphanGroup(
        service="shop",
        function="main.leak",
        go_statement="/src/main.go:30",
        count=3,
        oldest_age_seconds=192.0,
        oldest_age_is_lower_bound=lower_bound,
        reason="chan receive",
    )


def test_orphans_text_and_json_mark_lower_bounds() -> None:
    text = views.orphans_text(q.ListOrphansResponse(groups=[group(True), group(False)]))
    rows = text.splitlines()[1:]
    assert ">= 3.2m" in rows[0] and ">=" not in rows[1] and "3.2m" in rows[1]
    assert views.orphan_dict(group(True))["oldest_age_is_lower_bound"] is True
    assert views.orphan_dict(group(False))["oldest_age_is_lower_bound"] is False


def test_site_and_kept_goroutine_json_carry_the_flag() -> None:
    s = q.SiteStats(
        function="main.leak", age=t.AgeQuantiles(max_seconds=5, max_is_lower_bound=True)
    )
    assert views.site_dict(s)["oldest_age_is_lower_bound"] is True
    r = q.GoroutineRecord(
        goroutine=t.Goroutine(goid=9, age_seconds=12.5, age_is_lower_bound=True), pid=1
    )
    g = views.goroutine_dict(r)
    assert (g["age_seconds"], g["age_is_lower_bound"]) == (12.5, True)

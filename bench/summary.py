"""
The last step of C{make bench}: one JSON object with the figures of every benchmark that
ran (read back from bench/results/), and whether each met its target.
"""

from __future__ import annotations

import json
import os

RESULTS = "bench/results"
PARTS = ("core", "bus", "db", "agent", "alloc")


def main() -> dict:
    out: dict = {}
    for part in PARTS:
        path = os.path.join(RESULTS, f"{part}.json")
        try:
            with open(path) as f:
                out[part] = json.load(f)
        except (OSError, ValueError) as e:
            out[part] = {"error": f"{path}: {e}"}
    core, bus, agent, alloc = out["core"], out["bus"], out["agent"], out["alloc"]
    points = [point for backend in ("sqlite", "postgresql")
              for size in (alloc.get(backend) or {}).values() if isinstance(size, dict)
              for point in size.values() if isinstance(point, dict)]
    checks = {
        "localbus_rpc_per_s>=30000": core.get("localbus_rpc_per_s", 0) >= 30000,
        "bytes_per_pending_send<=2000": core.get("bytes_per_pending_send", 1e9) <= 2000,
        "bus_ratio_vs_oslo>=3": bus.get("ratio_vs_oslo", 0) >= 3,
        "bus_ratio_vs_raw>=0.67": bus.get("ratio_vs_raw", 0) >= 0.67,
        "agent_callback>=0.5*bare": agent.get("callback_cmds_per_s_1000", 0)
        >= 0.5 * agent.get("bare_http_rps_1000", float("inf")),
        "agent_lost==0": agent.get("lost", 1) == 0,
        # every allocation point ran without errors, and no capacity drifted after any
        "alloc_errors==0": bool(points) and all(p.get("errors", 1) == 0 for p in points),
        "alloc_drift==0": bool(points) and all(
            size.get("drift_after", 1) == 0 for backend in ("sqlite", "postgresql")
            for size in (alloc.get(backend) or {}).values() if isinstance(size, dict)),
    }
    out["targets_met"] = checks
    with open(os.path.join(RESULTS, "all.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()

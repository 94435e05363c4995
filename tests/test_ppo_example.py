"""examples/ppo_cartpole.py run as a user would: a subprocess, real workers, real learning.

The default suite runs a short budget and checks that the mean episodic return clearly rises; the full solve
(mean return >= 475 over 20 episodes) is marked slow.
"""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "ppo_cartpole.py"


def run_example(out_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not re.match(r"^(MASTER_PORT|LOCAL_RANK|RANK|WORLD_SIZE)$", key)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(EXAMPLE), "--out-dir", str(out_dir), "--logger", "csv", "--progress", "false", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    return result


def read_metrics(out_dir: Path) -> list[dict]:
    (metrics,) = out_dir.glob("ppo_cartpole/version_*/metrics.csv")
    with open(metrics) as handle:
        return [row for row in csv.DictReader(handle)]


def returns_by_step(rows: list[dict]) -> list[tuple[int, float]]:
    points = []
    for row in rows:
        value = row.get("charts/episodic_return", "")
        if value not in ("", "nan") and not math.isnan(float(value)):
            points.append((int(row["step"]), float(value)))
    return points


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["auto", "gloo"])  # shared memory on one host; gloo as for other hosts
def test_short_run_learns(tmp_path: Path, transport: str) -> None:
    """40K env steps: the mean return of the last 20 episodes rises far above a random policy's (about 22)."""
    result = run_example(tmp_path, "--total-timesteps", "40000", "--transport", transport, timeout=110)
    points = returns_by_step(read_metrics(tmp_path))
    assert len(points) >= 10, points
    early = max(value for _, value in points[:3])
    late = max(value for _, value in points[-5:])
    assert early < 60, f"a fresh policy should score like a random one, got {early}"
    assert late > 120 and late > 3 * early, f"the mean return did not clearly rise: {early:.1f} -> {late:.1f}"
    summary = next(tmp_path.glob("ppo_cartpole/version_*/summary.txt")).read_text()
    assert "steps/s" in summary and "version lag" in summary
    assert next(tmp_path.glob("ppo_cartpole/version_*/learning_curve.png")).stat().st_size > 10_000
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_flags_solve_cartpole(tmp_path: Path) -> None:
    """Default flags: mean return >= 475 over 20 episodes within the 500K-step budget, then training stops."""
    result = run_example(tmp_path, timeout=290)
    match = re.search(r"^solved: .* at (\d+) env steps, ([\d.]+)s wall time", result.stdout, re.MULTILINE)
    assert match, f"never solved:\n{result.stdout[-4000:]}"
    steps, wall = int(match.group(1)), float(match.group(2))
    print(f"solved at {steps} env steps, {wall:.1f}s wall time from process start")
    assert steps < 500_000
    # The run stops once solved: the budget is not spent.
    assert int(read_metrics(tmp_path)[-1]["step"]) == steps

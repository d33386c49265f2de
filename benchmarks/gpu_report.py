"""Merge the GPU check's step results into ONE JSON (called by gpu_check.sh as its last step).

Inputs, from gpu_check.sh's work folder: ``steps.tsv`` (name, limit, seconds, exit status per step),
``tests.xml`` (pytest's JUnit report of ``-m cuda``), and the JSON each benchmark wrote (``model.json``,
``infer.json``, ``train.json``, ``compare.json``; absent or partial when a step failed or hit its limit).
Output: one JSON with the machine, every step's status, every benchmark row, and a short summary of the
figures that answer the check's questions.

    python benchmarks/gpu_report.py WORKDIR OUT.json [--dry-run] [--nvidia-smi FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SECTIONS = {"model": "model.json", "infer": "infer.json", "train": "train.json", "attention_compare": "compare.json"}


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, limit, seconds, rc = line.split("\t")
            rc_i = int(rc)
            steps.append({"name": name, "limit_s": int(limit), "seconds": float(seconds), "rc": rc_i,
                          "timed_out": rc_i in (124, 137)})
    return steps


def read_tests(path: Path) -> dict:
    if not path.is_file():
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"ran": True, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skipped_tests": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out["failed"].append(name)
            elif case.find("skipped") is not None:
                out["skipped_tests"].append(name)
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def summary(sections: dict) -> dict:
    """The figures the check exists for, picked from the rows (None where a step did not deliver them)."""
    s: dict = {}
    rows = (sections.get("model") or {}).get("rows", [])
    for preset in ("tiny", "r31", "paper"):
        ok = [r for r in rows if r.get("preset") == preset and "error" not in r and r.get("dtype") == "bf16"]
        eager = [r for r in ok if not r.get("compile")]
        comp = [r for r in ok if r.get("compile")]
        s[f"anomaly_map_{preset}_bf16_tiles_per_s"] = max((r["tiles_per_s"] for r in eager), default=None)
        s[f"anomaly_map_{preset}_bf16_compiled_tiles_per_s"] = max((r["tiles_per_s"] for r in comp), default=None)
    inf = (sections.get("infer") or {}).get("rows", [])
    if inf:
        s["infer_end_to_end_tiles_per_s"] = inf[0].get("tiles_per_s")
        s["infer_model_only_tiles_per_s"] = inf[0].get("model_tiles_per_s")
        s["infer_ratio"] = inf[0].get("ratio")
    for r in (sections.get("train") or {}).get("rows", []):
        if r.get("kind") == "default" and "error" not in r:
            s[f"train_{r['preset']}_images_per_s"] = r.get("images_per_s")
            s[f"train_{r['preset']}_frac_of_matmul"] = r.get("frac_of_peak")
    for r in (sections.get("attention_compare") or {}).get("rows", []):
        s[f"compare_{r['preset']}_{r['attention']}"] = {k: r.get(k) for k in ("steps", "image_auroc", "pixel_auroc", "aupro")}
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--nvidia-smi", type=Path, default=None)
    p.add_argument("--budget", type=int, default=540)
    args = p.parse_args()
    sections = {}
    for key, name in SECTIONS.items():
        f = args.work / name
        try:
            sections[key] = json.loads(f.read_text()) if f.is_file() else None
        except json.JSONDecodeError as exc:
            sections[key] = {"unreadable": str(exc)}
    machine = next((v["machine"] for v in sections.values() if isinstance(v, dict) and "machine" in v), None)
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_common.REPO, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        git = None
    steps = read_steps(args.work / "steps.tsv")
    smi = args.nvidia_smi.read_text()[:4000] if args.nvidia_smi and args.nvidia_smi.is_file() else None
    result = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git,
        "budget_s": args.budget,
        "wall_s": round(sum(st["seconds"] for st in steps), 1),
        "machine": machine,
        "nvidia_smi": smi,
        "shared_data": os.environ.get("WSI_HALOAE_SHARED_DATA"),
        "steps": steps,
        "tests": read_tests(args.work / "tests.xml"),
        **sections,
    }
    result["summary"] = summary(sections)
    result["complete"] = bool(steps) and all(st["rc"] == 0 for st in steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"# wrote {args.out}: {len(steps)} steps, {sum(st['rc'] == 0 for st in steps)} ok, "
          f"{result['wall_s']} s of {args.budget}; tests {result['tests'].get('passed')} passed, "
          f"{result['tests'].get('failures', 0) + result['tests'].get('errors', 0)} failed, {result['tests'].get('skipped')} skipped")
    for k, v in result["summary"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()

"""Seed one-line bugs into a temporary copy of the package and check that the tests catch each one.

Each mutant replaces one exact line fragment of ``lightning_ste`` with a plausible slip (a setting replaced by
its default, a non-strict load, a floor or cap dropped, the wrong reduction over ranks, a region weight
off, ...), runs the tests named for it against the mutated copy, and counts it *killed* when they fail.
A mutant whose fragment is no longer in the code is reported as *stale* (the code moved on), not counted.

    python benchmarks/mutation_check.py               # every mutant
    python benchmarks/mutation_check.py --only rho-cap,strict-load --list

The copy runs with the default backend, as the suite does (the CPU kernels' build cache is keyed by their source
text and the environment, so the copy reuses it); mutants of the fused kernels are ``tests/test_kernels.py``'s
business. A control run of the unmutated copy comes first. Prints one line per mutant and the score.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    old: str  # an exact fragment, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids or paths, relative to the repository root


SETTINGS = "tests/test_settings.py"
MUTANTS = [
    # a setting lost on its way to the quantizer
    Mutant(
        "act-alpha_lr_scale-default",
        "lightning_ste/surgery/activation_plan.py",
        "alpha_lr_scale=c.alpha_lr_scale,",
        "alpha_lr_scale=0.01,",
        (SETTINGS + "::test_activation_setting_on_every_route",),
    ),
    Mutant(
        "act-recipe-rounding-default",
        "lightning_ste/surgery/activation_plan.py",
        'config = ActivationQuantConfig.from_dict(recipe["arguments"])',
        'config = ActivationQuantConfig.from_dict({**recipe["arguments"], "rounding": "ceil"})',
        (SETTINGS + "::test_activation_setting_on_every_route",),
    ),
    Mutant(
        "act-recipe-bits-default",
        "lightning_ste/surgery/activation_plan.py",
        'config = ActivationQuantConfig.from_dict(recipe["arguments"])',
        'config = ActivationQuantConfig.from_dict({**recipe["arguments"], "bits": 4})',
        (SETTINGS + "::test_activation_setting_on_every_route",),
    ),
    Mutant(
        "weights-recipe-per_channel-default",
        "lightning_ste/surgery/weight_params.py",
        'arguments = dict(recipe.get("arguments") or {})',
        'arguments = {**dict(recipe.get("arguments") or {}), "per_channel": False}',
        (SETTINGS + "::test_weight_setting_on_every_route",),
    ),
    Mutant(
        "calibration_batches-ignored",
        "lightning_ste/quantizers/activation.py",
        "self.calibrated_batches < self.calibration_batches",
        "self.calibrated_batches < 1",
        (SETTINGS + "::test_activation_setting_on_every_route",),
    ),
    # checkpoints loaded non-strictly
    Mutant(
        "strict-load",
        "lightning_ste/recipe.py",
        'model.load_state_dict(checkpoint["state_dict"], strict=True)',
        'model.load_state_dict(checkpoint["state_dict"], strict=False)',
        ("tests/test_reliability.py::test_restores_are_strict_a_missing_and_an_unexpected_key_fail",),
    ),
    Mutant(
        "rho-state-lenient",
        "lightning_ste/blend.py",
        'if not isinstance(state, dict) or set(state) != {"rho", "epoch"}:',
        "if not isinstance(state, dict):",
        ("tests/test_reliability.py::test_restores_are_strict_a_missing_and_an_unexpected_key_fail",),
    ),
    # the frozen model diverging from the trained one at an edge
    Mutant(
        "freeze-floor-dropped",
        "lightning_ste/export.py",
        "value = torch.as_tensor(alpha, dtype=torch.float32).detach().clone().clamp_min(ALPHA_FLOOR)",
        "value = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()",
        (
            "tests/test_export.py::test_frozen_and_packed_models_match_the_trained_one_with_alpha_below_its_floor",
        ),
    ),
    # DDP calibration semantics
    Mutant(
        "ddp-calibration-rank0",
        "lightning_ste/callbacks/quantize_activations.py",
        "gathered.reshape(-1, len(changed)).amax(0)",
        "gathered.reshape(-1, len(changed))[0]",
        ("tests/test_ddp_calibration.py",),
    ),
    # the math
    Mutant(
        "alpha-grad-mean-region-weight",
        "lightning_ste/quantizers/activation.py",
        '"mean": (float(2 ** (bits - 1)), float(levels)),',
        '"mean": (float(2**bits), float(levels)),',
        ("tests/test_callback_activations.py::test_learned_alpha_is_added_to_a_hand_written_optimizer_once",),
    ),
    Mutant(
        "rho-cap-dropped",
        "lightning_ste/blend.py",
        "self.rho = min(self.rho * self.rate, self.max)",
        "self.rho = self.rho * self.rate",
        (SETTINGS + "::test_weight_setting_on_every_route",),
    ),
    Mutant(
        "blend-wrong-order",
        "lightning_ste/blend.py",
        "foreach_mul_(ws, 1 - r)\n        foreach_add_(ws, foreach_mul(qs, r))",
        "foreach_mul_(ws, r)\n        foreach_add_(ws, foreach_mul(qs, 1 - r))",
        (SETTINGS + "::test_weight_setting_on_every_route",),
    ),
    Mutant(  # the single-tensor blend (taken under ModelPruning's mask)
        "blend-wrong-order-single",
        "lightning_ste/blend.py",
        "return latent.mul_(1 - rho).add_(quantized.to(latent.dtype) * rho)",
        "return latent.mul_(rho).add_(quantized.to(latent.dtype) * (1 - rho))",
        ("tests/test_blend.py",),
    ),
    # the one plan shape and the one recipe store
    Mutant(
        "plan-apply-no-undo",
        "lightning_ste/surgery/plan.py",
        "        except BaseException:\n            self.revert()\n            raise",
        "        except BaseException:\n            raise",
        ("tests/test_plan.py",),
    ),
    Mutant(
        "recipe-not-written",
        "lightning_ste/recipe.py",
        '        checkpoint[CHECKPOINT_KEY] = {"recipes": copy.deepcopy(recipes)}',
        "        pass",
        ("tests/test_callback_weights.py::test_resume_is_bit_exact_and_load_rebuilds_the_model",),
    ),
    Mutant(
        "packed-load-lenient",
        "lightning_ste/export.py",
        "    if missing or unexpected:\n        raise ValueError(",
        "    if False:\n        raise ValueError(",
        ("tests/test_export.py::test_load_packed_is_strict_a_missing_and_an_unexpected_blob_fail",),
    ),
]


def run_mutant(m: Mutant, timeout: float) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'stale' | 'timeout', seconds, detail) for one mutant (m.old == m.new: control)."""
    source = (REPO / m.file).read_text()
    if m.old != m.new and source.count(m.old) != 1:
        return "stale", 0.0, f"fragment found {source.count(m.old)} times in {m.file}"
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        root = Path(tmp)
        for part in ("lightning_ste", "tests"):
            shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
        (root / m.file).write_text(source.replace(m.old, m.new))
        env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        # The copy must be what the tests import: the repository root first on sys.path, no installed package.
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:warnings",
            *m.tests,
        ]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        out = (done.stdout + done.stderr).strip().splitlines()
        failed = [line for line in out if line.startswith("FAILED") or line.startswith("ERROR")]
        if done.returncode == 0:
            return "survived", seconds, out[-1] if out else ""
        if done.returncode == 1 and failed:
            return "killed", seconds, failed[0][:150]
        return "killed?", seconds, f"pytest exit {done.returncode}: {(out or [''])[-1][:150]}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated mutant ids")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("--no-control", action="store_true", help="skip the run of the unmutated copy")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.id:38s} {m.file}  ->  {' '.join(m.tests)}")
        return
    if not args.no_control:
        # The unmutated copy must pass the same tests, or a "kill" could be the environment's doing.
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        verdict, seconds, detail = run_mutant(Mutant("control", MUTANTS[0].file, "", "", tests), args.timeout)
        print(
            f"{'passes' if verdict == 'survived' else 'FAILS':9s} {'control (no mutation)':38s} {seconds:6.1f}s"
        )
        if verdict != "survived":
            sys.exit(f"the unmutated copy fails its tests: {detail}")
    results = []
    for m in chosen:
        verdict, seconds, detail = run_mutant(m, args.timeout)
        results.append(verdict)
        print(f"{verdict:9s} {m.id:38s} {seconds:6.1f}s  {detail}", flush=True)
    counted = [v for v in results if v != "stale"]
    killed = sum(v == "killed" for v in counted)
    print(f"score: {killed}/{len(counted)} killed ({len(results) - len(counted)} stale)")


if __name__ == "__main__":
    main()

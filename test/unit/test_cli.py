"""`pi0-policy` itself: the global options before the command, and bad inputs as one error line
(exit code 2) instead of a traceback."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pi0_policy_ros import export_cli
from pi0_policy_ros.cli import main
from pi0_policy_ros.errors import ConfigError
from test.paths import PI05_FIXTURE, REPO_ROOT
from test.unit.test_policy import write_openpi_dir


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in lines[0], lines
    return lines[0]


def test_log_level_before_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    # `--log-level INFO selftest ...` stopped the command lookup at "INFO", so the command's own
    # arguments were "unrecognized".
    assert main(["--log-level", "info", "selftest", "--reference", str(PI05_FIXTURE)]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in any command (a demo, a replay, a bench): its own cleanup runs, then one line instead
    of a KeyboardInterrupt traceback, and the shell's exit code for an interrupted command."""
    from pi0_policy_ros import rtc_eval

    def interrupted(args) -> int:  # noqa: ANN001
        raise KeyboardInterrupt
    monkeypatch.setattr(rtc_eval, "run", interrupted)
    assert main(["rtc-eval"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "pi0-policy rtc-eval: interrupted\n"


def test_unknown_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--log-level", "chatty", "selftest", "--reference", str(PI05_FIXTURE)])
    assert exc.value.code == 2
    assert "invalid choice: 'CHATTY'" in capsys.readouterr().err


def test_missing_reference_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selftest", "--reference", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint file not found" in one_error_line(capsys)


@pytest.mark.parametrize("command", [["selftest", "--reference"], ["export", "--stages", "vision", "--reference"]])
def test_a_directory_for_a_safetensors_file_is_named_as_such(command: list[str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # It said "checkpoint file not found" for a path that exists (a directory given for a file).
    argv = [*command, str(tmp_path)] + (["--out", str(tmp_path / "onnx")] if command[0] == "export" else [])
    assert main(argv) == 2
    assert f"checkpoint file {tmp_path}: expected a safetensors file, found a directory" in one_error_line(capsys)


def test_bench_takes_a_checkpoint_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # bench's --checkpoint took an openpi-named safetensors file only, where the node and export take
    # the checkpoint directory a user has: a directory was "expected a safetensors file".
    from argparse import Namespace

    from pi0_policy_ros.engine.bench import _load_model
    from pi0_policy_ros.model.checkpoint import load_checkpoint
    from pi0_policy_ros.model.config import get_preset

    ckpt = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    cfg = get_preset("pi05_small")
    args = Namespace(checkpoint=str(ckpt), preset="pi05_small", seed=0)
    got = _load_model(cfg, args, torch.device("cpu"), torch.float32).state_dict()
    want = load_checkpoint(cfg, ckpt / "model.safetensors", allow_truncated_vocab=True).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    out = tmp_path / "bench.json"
    assert main(["bench", "--cpu", "--preset", "pi05_small", "--checkpoint", str(ckpt), "--iterations", "1",
                 "--eager-iterations", "1", "--no-fp32-reference", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["checkpoint"] == str(ckpt)
    capsys.readouterr()  # the table
    # A directory of neither layout is the loader's one error, naming both.
    assert main(["bench", "--cpu", "--preset", "pi05_small", "--checkpoint", str(tmp_path / "ckpt" / "assets")]) == 2
    assert "unknown checkpoint layout" in one_error_line(capsys)


@pytest.mark.parametrize("config", ['{"other": 1}', "not json"])
def test_safetensors_that_is_not_a_fixture_is_one_error(tmp_path: Path, config: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # A weights file with some other 'config' metadata (e.g. written by another tool).
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"config": config})
    assert main(["selftest", "--reference", str(path)]) == 2
    assert "not an openpi reference fixture" in one_error_line(capsys)


@pytest.mark.parametrize("dropped", ["outputs/actions", "intermediate/denoise_v_t"])
def test_fixture_without_its_reference_values_is_one_error(dropped: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Weights and inputs are enough for `export --reference`; selftest also needs openpi's stored
    # values, and ran the model, then died on a KeyError traceback with exit code 1 ("check failed").
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(PI05_FIXTURE), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(PI05_FIXTURE))
    del tensors[dropped]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    assert main(["selftest", "--reference", str(path)]) == 2
    assert f"found 1 of them missing: ['{dropped}']" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_unknown_preset_lists_the_valid_ones(command: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_openpi_dir(tmp_path / "ckpt", PI05_FIXTURE)
    argv = ([command, str(ckpt), "--model-preset", "pi5"] if command == "inspect"
            else [command, "--model-preset", "pi5", "--out", str(tmp_path / "onnx")])
    assert main(argv) == 2
    assert "unknown model preset 'pi5'; valid presets: ['pi0', 'pi05'" in one_error_line(capsys)


def test_export_auto_preset_without_a_checkpoint_says_what_is_missing(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # --help offers 'auto' ("reads the geometry off the checkpoint"); without --checkpoint the
    # error was "unknown model preset 'auto'", a preset the same help had just named.
    assert main(["export", "--model-preset", "auto", "--out", str(tmp_path / "onnx")]) == 2
    line = one_error_line(capsys)
    assert "--model-preset auto reads the geometry off --checkpoint, and none was given" in line
    assert "'pi05_small'" in line
    assert not (tmp_path / "onnx").exists()  # the --out it made for nothing is gone again


@pytest.mark.parametrize("seed", ["0", "7"])
def test_export_seed_with_a_reference_is_one_error(seed: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The fixture holds the weights and the inputs: --seed 7 wrote the same files with the same
    # --verify errors as --seed 0, without a word.
    out = tmp_path / "onnx"
    assert main(["export", "--reference", str(PI05_FIXTURE), "--stages", "vision", "--out", str(out),
                 "--seed", seed]) == 2
    assert ("error: --seed draws random weights and inputs, and --reference takes both from its fixture: drop "
            "--seed, or use --model-preset for random weights and inputs") in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("source", [["--model-preset", "nope"], ["--model-preset", "pi05_small", "--checkpoint", "missing"]])
def test_export_that_fails_on_its_model_leaves_no_empty_output(source: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", *source, "--out", str(tmp_path / "onnx")]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "onnx").exists()
    (tmp_path / "kept").mkdir()
    assert main(["export", *source, "--out", str(tmp_path / "kept")]) == 2
    one_error_line(capsys)
    assert (tmp_path / "kept").is_dir()  # a directory the user had stays


def _model_loaded_too_early(*args: object) -> None:
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize(("under", "expected"), [("", "expected a directory, found a file"),
                                               ("sub", "cannot create this directory: Not a directory")])
def test_export_into_a_file_is_one_error(under: str, expected: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # It was "[Errno 17] File exists", after the model had loaded and its first stage was traced.
    monkeypatch.setattr(export_cli, "_load_model", _model_loaded_too_early)
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    out = taken / under if under else taken
    assert main(["export", "--reference", str(PI05_FIXTURE), "--stages", "vision", "--out", str(out)]) == 2
    assert f"--out {out}: {expected}" in one_error_line(capsys)
    assert taken.read_text() == "not a directory"


@pytest.mark.skipif(not Path("/proc/sys").is_dir(), reason="needs Linux's /proc/sys")
def test_export_into_a_directory_it_may_not_write_is_one_error(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # procfs refuses new files under /proc/sys to root too (a read-only file system does the same):
    # the export loaded the model, traced the first stage and then said "[Errno 2] No such file or
    # directory: '/proc/sys/.vision.fp32.onnx.s59zoosf'", a name it never gave.
    monkeypatch.setattr(export_cli, "_load_model", _model_loaded_too_early)
    assert main(["export", "--reference", str(PI05_FIXTURE), "--stages", "vision", "--out", "/proc/sys"]) == 2
    assert "--out /proc/sys: expected a directory it may write in, found one it may not" in one_error_line(capsys)


@pytest.mark.parametrize(("hidden", "verify"), [("onnx", []), ("onnxruntime", ["--verify"])])
def test_export_without_the_onnx_packages_is_one_error(hidden: str, verify: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # They are development dependencies only. On a runtime install the export was an ImportError
    # traceback (for onnxruntime: after the files were written, before any was verified).
    monkeypatch.setitem(sys.modules, hidden, None)  # `import <hidden>` raises ImportError
    out = tmp_path / "onnx"
    assert main(["export", "--reference", str(PI05_FIXTURE), "--stages", "vision", "--out", str(out), *verify]) == 2
    assert f"needs the Python packages {hidden}, which are not installed" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", ["soak", "load-bench", "bench"])
def test_json_that_cannot_be_written_fails_before_the_run(command: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The result used to be written after the whole run (30 min for soak) and then lost; a file
    # where its folder should be was "cannot create its directory: File exists" ("[Errno 17]" for bench).
    argv = [command, *(["--preset", "pi05_small", "--cpu"] if command == "bench" else [])]
    assert main([*argv, "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path}: expected a file name, found a directory" in one_error_line(capsys)
    (tmp_path / "taken").write_text("a file")
    assert main([*argv, "--json", str(tmp_path / "taken" / "out.json")]) == 2
    assert f"expected {tmp_path / 'taken'} to be a directory, found a file" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_bench_without_cuda_needs_cpu_and_then_runs_the_fallback(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Full-size eager on the CPU ran for ten minutes at 7.6 GB before anything was printed.
    argv = ["bench", "--preset", "pi05_small", "--iterations", "2", "--eager-iterations", "1", "--no-fp32-reference"]
    assert main(argv) == 2
    assert "bench times the GPU engine: expected a CUDA device, found none; --cpu" in one_error_line(capsys)
    out = tmp_path / "bench.json"
    assert main([*argv, "--cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "pi05_small" and result["environment"]["cuda"] is None
    assert result["precisions"]["bfloat16"]["timings_ms"]["e2e"]["n"] == 2


def test_bench_variants_on_the_cpu_fallback_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The variants are CUDA graphs of the denoise chain: with --cpu the flag was dropped, and the run
    # printed its table and exited 0 as if they had been timed.
    from pi0_policy_ros.engine import bench

    monkeypatch.setattr(bench, "_load_model", _model_loaded_too_early)
    argv = ["bench", "--cpu", "--variants", "--preset", "pi05_small", "--iterations", "1", "--eager-iterations", "1",
            "--no-fp32-reference", "--json", str(tmp_path / "bench.json")]
    assert main(argv) == 2
    assert "--variants times the denoise-chain variants (torch ops, Triton configs) as CUDA graphs: expected the " \
        "GPU engine, found --cpu" in one_error_line(capsys)
    assert not (tmp_path / "bench.json").exists()


def test_bench_fp8_on_the_cpu_fallback_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The eager fallback has no FP8 path: "[fp8]" timed the bf16 model again, with the bf16 errors.
    from pi0_policy_ros.engine import bench

    monkeypatch.setattr(bench, "_load_model", _model_loaded_too_early)
    argv = ["bench", "--cpu", "--precision", "bfloat16,fp8", "--preset", "pi05_small", "--iterations", "1",
            "--eager-iterations", "1", "--no-fp32-reference", "--json", str(tmp_path / "bench.json")]
    assert main(argv) == 2
    assert "--precision fp8: expected the GPU engine (its FP8 prefix), found --cpu" in one_error_line(capsys)
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_bench_denoise_kernels_on_the_cpu_fallback_are_refused(kernels: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The eager fallback has no denoise chain to pick kernels for: the option was dropped, and the
    # table said denoise=torch under a run asked for with triton.
    from pi0_policy_ros.engine import bench

    monkeypatch.setattr(bench, "_load_model", _model_loaded_too_early)
    argv = ["bench", "--cpu", "--denoise-kernels", kernels, "--preset", "pi05_small", "--iterations", "1",
            "--eager-iterations", "1", "--no-fp32-reference", "--json", str(tmp_path / "bench.json")]
    assert main(argv) == 2
    assert (f"--denoise-kernels {kernels}: expected the GPU engine (its CUDA-graph denoise chain), found --cpu "
            "(the eager CPU fallback, which runs the model's own denoise loop): leave it at auto"
            in one_error_line(capsys))
    assert not (tmp_path / "bench.json").exists()


PROMPT_RANGE = "--prompt-len: expected 0 (the preset's 200) or 1 to {} tokens (Gemma's 8192 positions less {} image " \
               "tokens and 10 action tokens), found {}"


@pytest.mark.parametrize(("option", "expected"), [
    # A mistyped size was numpy's out of memory (3 x 224 x 224 x 100000000 bytes), a traceback
    # mid-run (the prompt's embeddings, its attention mask) or, where the allocation fit, the OOM
    # killer (exit 137). pi05_small: 3 slots of 256 image tokens, 10 actions.
    (["--cameras", "100000000"], "--cameras: expected 1 to 3 (the model's image slots), found 100000000"),
    (["--cameras", "4"], "--cameras: expected 1 to 3 (the model's image slots), found 4"),
    (["--cameras", "0"], "--cameras: expected 1 to 3 (the model's image slots), found 0"),
    (["--prompt-len", "100000000"], PROMPT_RANGE.format(7414, 768, 100000000)),
    (["--prompt-len", "7415"], PROMPT_RANGE.format(7414, 768, 7415)),
    (["--prompt-len", "-1"], PROMPT_RANGE.format(7414, 768, -1)),
    (["--cameras", "1", "--prompt-len", "7927"], PROMPT_RANGE.format(7926, 256, 7927)),
])
def test_bench_sizes_beyond_the_model_are_one_error(option: list[str], expected: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pi0_policy_ros.engine import bench

    monkeypatch.setattr(bench, "_load_model", _model_loaded_too_early)
    argv = ["bench", "--cpu", "--preset", "pi05_small", "--iterations", "1", "--eager-iterations", "1",
            "--no-fp32-reference", "--json", str(tmp_path / "bench.json"), *option]
    assert main(argv) == 2
    assert f"pi0-policy bench: error: {expected}" == one_error_line(capsys)
    assert not (tmp_path / "bench.json").exists()


def test_bench_sizes_at_the_models_limits_pass_the_check() -> None:
    from pi0_policy_ros.engine.bench import check_sizes
    from pi0_policy_ros.model.config import get_preset

    for preset, prompt_len in (("pi05", 7414), ("pi0", 7373)):  # pi0: 50 actions and its state token
        check_sizes(get_preset(preset), 3, prompt_len)
        with pytest.raises(ConfigError, match=f"1 to {prompt_len} tokens"):
            check_sizes(get_preset(preset), 3, prompt_len + 1)
    check_sizes(get_preset("pi05"), 1, 0)


def _refuse_non_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON: jq and JSON.parse refuse the document")


def test_bench_json_records_the_valid_counts_that_ran(tmp_path: Path) -> None:
    # More valid cameras or tokens than the graph holds are cut to its size; the JSON recorded
    # the counts asked for (2 cameras in a 1-slot graph) beside a prefix_rows of 1 slot.
    out = tmp_path / "bench.json"
    argv = ["bench", "--cpu", "--preset", "pi05_small", "--cameras", "1", "--valid-cameras", "2", "--valid-tokens", "500",
            "--iterations", "1", "--eager-iterations", "1", "--no-fp32-reference", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text(), parse_constant=_refuse_non_json)  # stage times without CUDA: null
    assert (result["valid_cameras"], result["valid_tokens"]) == (1, 200)  # pi05_small's prompt: 200 tokens
    assert result["prefix_rows"]["slots"] == 1 and result["shape"]["prompt_len"] == 200
    assert result["environment"]["device"] == "cpu"  # --cpu times the CPU, with CUDA or without
    assert result["precisions"]["bfloat16"]["copies_in_graphs"] is False  # the eager fallback has no graphs


def test_bench_on_the_cpu_reports_the_full_prefix_it_computes(tmp_path: Path) -> None:
    # The eager fallback computes every camera slot and the whole prompt; the report said
    # "prefix rows computed: 544 (compact)" of 976, and --full-prefix changed nothing but that line.
    out = tmp_path / "bench.json"
    argv = ["bench", "--cpu", "--preset", "pi05_small", "--valid-cameras", "2", "--valid-tokens", "24",
            "--iterations", "1", "--eager-iterations", "1", "--no-fp32-reference", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["compact_prefix"] is False
    rows = result["prefix_rows"]
    assert (rows["slots"], rows["prompt"], rows["rows"]) == (3, 200, rows["full_rows"])


def test_bench_table_on_the_cpu_has_no_unmeasured_rows(capsys: pytest.CaptureFixture[str]) -> None:
    # Without CUDA events only e2e is measured: the table had seven rows of "nan nan nan", a
    # speed-up of "nanx", a "peak GPU nan GiB", and with --rtc "chain nan ms ... = nanx the plain chain".
    argv = ["bench", "--cpu", "--preset", "pi05_small", "--iterations", "1", "--eager-iterations", "1",
            "--no-fp32-reference", "--rtc"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "nan" not in table and "peak GPU" not in table
    assert [line.split()[0] for line in table.splitlines() if _is_float(line.split()[1:2])] == ["e2e"]


def _is_float(fields: list[str]) -> bool:
    try:
        float(fields[0])
    except (IndexError, ValueError):
        return False
    return True


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_bench_reports_no_commit_for_a_copy_outside_its_checkout(tmp_path: Path) -> None:
    # An installed copy (site-packages in a .venv) inside another repository reported that
    # repository's HEAD as the commit that was benchmarked.
    other = tmp_path / "other_repo"
    shutil.copytree(REPO_ROOT / "pi0_policy_ros", other / "site-packages" / "pi0_policy_ros",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "unrelated"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PI0_GIT_")}
    env["PYTHONPATH"] = str(other / "site-packages")
    code = "import json; from pi0_policy_ros.engine import bench; print(json.dumps(bench._git()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"commit": "unknown", "dirty": True}


# procfs refuses new files under /proc/sys to every user, root included (a read-only folder
# would not do: root writes there all the same).
UNWRITABLE_DIR = Path("/proc/sys")


@pytest.mark.skipif(not UNWRITABLE_DIR.is_dir(), reason="needs Linux's /proc/sys")
@pytest.mark.parametrize("argv", [["bench", "--preset", "pi05_small", "--cpu", "--iterations", "1",
                                   "--eager-iterations", "1", "--json"],
                                  ["rtc-eval", "--model", "fixture-pi05", "--modes", "naive", "--chunks", "2",
                                   "--delays", "0", "--output"]])
def test_json_in_a_folder_that_cannot_be_written_fails_before_the_run(argv: list[str],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # A read-only folder passed the check: bench and rtc-eval ran (minutes at full size), printed
    # their table and then ended in "[Errno 30] Read-only file system: 'ro/b.json'", the result lost.
    out = UNWRITABLE_DIR / "pi0_report.json"
    assert main([*argv, str(out)]) == 2
    line = one_error_line(capsys)
    assert f"{argv[-1]} {out}: expected a folder it may write in, found {UNWRITABLE_DIR}: " in line, line


def test_json_folder_is_made_up_front(tmp_path: Path) -> None:
    from pi0_policy_ros.jsonout import prepare_output_file

    prepare_output_file(tmp_path / "results" / "soak.json")
    assert (tmp_path / "results").is_dir() and not (tmp_path / "results" / "soak.json").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["demo", "--params", "no_such.yaml"], "params file no_such.yaml: expected a ROS parameter file"),
    (["demo", "--duration", "-5"], "duration: expected > 0 s, found -5.0"),  # was time.sleep's ValueError
    # time.sleep's OverflowError traceback (exit 1) after the node had configured
    (["demo", "--duration", "inf"], "duration: expected a finite number of seconds, found inf"),
    (["soak", "--minutes", "inf"], "minutes: expected a finite number, found inf"),
    (["load-bench", "--warmup-s", "inf"], "warmup_s: expected a finite number of seconds, found inf"),
    (["load-bench", "--params", "no_such.yaml"], "params file no_such.yaml"),  # was an rcl traceback
    (["load-bench", "--seconds", "-1"], "seconds: expected > 0 s"),  # ran, then reported 0 Hz
    (["soak", "--sample-s", "0"], "sample_s: expected > 0"),  # the sampler spun, 170k samples in 6 s
    (["soak", "--minutes", "-1"], "minutes: expected > 0"),
    # Shorter than its warm-up, a soak measured no growth and printed "flat".
    (["soak", "--minutes", "0.5", "--sample-s", "5"], "minutes: expected a soak of at least the warm-up plus two "
                                                      "samples, 5.17 min"),
])
def test_bad_run_arguments_fail_before_the_node_starts(argv: list[str], expected: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert expected in one_error_line(capsys)


def test_soak_growth_without_two_samples_after_warmup_is_not_measured() -> None:
    from pi0_policy_ros.soak import Sample, growth_after_warmup

    samples = [Sample(t_s=t, rss_bytes=int(100e6 * (1 + t / 30)), gpu=None, threads=10) for t in (0, 10, 20, 30)]
    assert math.isnan(growth_after_warmup(samples, 300.0, "rss"))  # was 0.0, which passed as flat
    assert growth_after_warmup(samples, 10.0, "rss") == pytest.approx((5 / 3 - 4 / 3) / (4 / 3))  # mean of the last 3


@pytest.mark.parametrize("command", ["demo", "soak"])
def test_params_help_names_the_file_that_device_cuda_runs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Without --params, `--device cuda` runs config/demo_cuda.yaml (full-size pi0.5); the help named
    # config/demo.yaml alone, as if the tiny CPU model were moved to the GPU.
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert ("(default: the package's config/demo.yaml, or config/demo_cuda.yaml with --device cuda)"
            in " ".join(capsys.readouterr().out.split()))


@pytest.mark.parametrize("command", ["demo", "load-bench"])
def test_a_mistyped_parameter_in_the_file_fails_before_the_node_starts(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # rclpy ignores undeclared parameters: the demo ran at the default control rate.
    typo = tmp_path / "typo.yaml"
    typo.write_text((REPO_ROOT / "config" / "demo.yaml").read_text().replace("control_rate_hz:", "control_rate:"))
    assert main([command, "--params", str(typo)]) == 2
    assert "found 'control_rate' (did you mean 'control_rate_hz'?)" in one_error_line(capsys)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--image-size", "abc"], "--image-size: expected HxW in pixels"),  # was int()'s ValueError
    (["--iterations", "0"], "--iterations: expected an integer >= 1"),  # was an IndexError after the run
    (["--eager-iterations", "0"], "--eager-iterations: expected an integer >= 1"),
    (["--valid-tokens", "-3"], "--valid-tokens: expected an integer >= 0"),  # was numpy's ValueError
    (["--valid-cameras", "-1"], "--valid-cameras: expected an integer >= 0"),  # ran with no valid camera
    # Never ended: from about 3.4e7 steps the float32 Euler time stops moving (model.config.MAX_DENOISE_STEPS).
    (["--steps", "100000000"], "--steps: expected 0 (the preset's) or 1 to 5858 denoise steps"),
    (["--steps", "5859"], "--steps: expected 0 (the preset's) or 1 to 5858 denoise steps"),
    (["--steps", "-1"], "--steps: expected 0 (the preset's) or 1 to 5858 denoise steps"),
    # Three frames of 100000x100000 were numpy's out of memory; smaller ones fit, then the OOM killer.
    (["--image-size", "100000x100000"], "--image-size: expected HxW in pixels, each 1 to 8192 (the node's "
                                        "camera_height / camera_width range)"),
    (["--image-size", "8193x224"], "--image-size: expected HxW in pixels, each 1 to 8192"),
])
def test_bench_usage_errors(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--preset", "pi05_small", *argv])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


SEED_COMMANDS = {  # every command with a --seed, each as small as it runs
    "bench": ["bench", "--cpu", "--preset", "pi05_small", "--iterations", "1", "--eager-iterations", "1",
              "--no-fp32-reference"],
    "rtc-eval": ["rtc-eval", "--model", "fixture-pi0", "--modes", "naive", "--delays", "0", "--chunks", "1"],
    "export": ["export", "--model-preset", "pi05_small", "--stages", "vision"],
}


@pytest.mark.parametrize("seed", [str(2**64), str(2**31), "-1", "seven"])
@pytest.mark.parametrize("command", sorted(SEED_COMMANDS))
def test_a_seed_outside_the_range_every_generator_takes_is_a_usage_error(
        command: str, seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 2**64 was torch.manual_seed's "Overflow when unpacking long long" traceback after the run had
    # started (rtc-eval: mid-run, at its first chunk); -1 numpy's "expected non-negative integer".
    out = ["--out", str(tmp_path / "onnx")] if command == "export" else []
    with pytest.raises(SystemExit) as exc:
        main([*SEED_COMMANDS[command], "--seed", seed, *out])
    assert exc.value.code == 2
    assert f"--seed: expected an integer in [0, 2147483647] (the node's seed parameter's range), found '{seed}'" \
        in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def test_seed_range_ends_are_seeds() -> None:
    from pi0_policy_ros.cli import seed_argument

    assert (seed_argument("0"), seed_argument(str(2**31 - 1))) == (0, 2**31 - 1)


@pytest.mark.parametrize(("value", "expected"), [
    ("contrl_rate_hz=10", "--set: expected names of the node's parameters, found 'contrl_rate_hz' "
                          "(did you mean 'control_rate_hz'?)"),
    ("control_rate_hz", "expected NAME=VALUE with a node parameter NAME, found 'control_rate_hz'"),
    ("control_rate_hz=fast", "control_rate_hz: expected a double, found 'fast'"),
])
def test_load_bench_set_errors(value: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["load-bench", "--set", value])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", ","])
def test_bench_without_a_precision_is_one_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    # It timed the eager model only, printed a table with no engine in it and exited 0.
    argv = ["bench", "--cpu", "--preset", "pi05_small", "--iterations", "1", "--eager-iterations", "1",
            "--no-fp32-reference", "--precision", text]
    assert main(argv) == 2
    assert f"--precision: expected a comma-separated list from ['bfloat16', 'float32', 'fp8'], found {text!r}" \
        in one_error_line(capsys)


def test_bench_unknown_precision_is_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "pi05_small", "--precision", "bfloat16,int4"]) == 2
    assert "unknown precision 'int4'" in one_error_line(capsys)
    from pi0_policy_ros.engine import bench  # as the GPU runs start it: python -m pi0_policy_ros.engine.bench

    assert bench.main(["--preset", "pi05_small", "--precision", "int4"]) == 2
    assert "unknown precision 'int4'" in one_error_line(capsys)

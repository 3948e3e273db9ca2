"""eval.plot_run: training curves of one or several runs drawn from train_log.jsonl into one PNG."""

import json
import math

import pytest
from PIL import Image

from eval.plot_run import load_run_log, main, plot_run_logs

pytest.importorskip("matplotlib")

SIZE = (1600, 900)  # FIGSIZE x DPI


def _val(step, epoch, tasks, gap):
    loss = 2.0 * math.exp(-step / 10) + 0.5
    rec = {"kind": "val", "step": step, "epoch": epoch, "val_loss": loss, "val_tokens": 1820,
           **{f"val_loss_{t}": loss * (1 + i / 4) for i, t in enumerate(tasks)}}
    if gap:
        g = 0.02 * step / 12
        rec.update(image_gap=g, image_gap_ci_low=g - 0.005, image_gap_ci_high=g + 0.006,
                   **{f"image_gap_{t}": g * (1 + i / 2) for i, t in enumerate(tasks)})
    return rec


def write_log(run_dir, tasks=("caption", "summary", "cot"), gap=False, groups=("lora_and_prefix",), steps=12):
    """A run log in the trainer's format (trainer/metrics.py train records, trainer/validation.py val records)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"kind": "start", "step": 0, "total_steps": steps, "steps_per_epoch": [steps // 2] * 2,
             "batches_per_epoch": [steps // 2] * 2, "batch_size_per_phase": {"uniform": 4}, "world_size": 2},
            _val(0, -1, tasks, gap)]
    for s in range(1, steps + 1):
        loss = 2.2 * math.exp(-s / 10) + 0.6
        recs.append({"kind": "train", "step": s, "loss": loss,
                     **{f"loss_{t}": loss * (1 + i / 4) for i, t in enumerate(tasks)},
                     "real_tokens": 900, "tokens_per_s": 1500.0 + 10 * s, "task_mix": {t: 1 for t in tasks},
                     "truncation": {}, "bad_samples": 0.0, "pad_duplicates": 0.0, "task_fallbacks": 0.0,
                     "epoch": (s - 1) // (steps // 2), "lr": {g: 1e-3 * (1 - s / steps) / (1 + 9 * i)
                                                             for i, g in enumerate(groups)},
                     "tokens_seen": 900 * s, "nan_steps_total": 0,
                     "rank_ms_per_step": {"data": [1.0, 1.0], "fwd_bwd": [5.0, 5.0], "step": [1.0, 1.0],
                                          "other": [0.1, 0.1]}})
        if s % (steps // 2) == 0:
            recs.append(_val(s, s // (steps // 2) - 1, tasks, gap))
    recs.append({"kind": "sample", "step": steps, "key": "k", "task": "caption", "generation": "g", "reference": "r"})
    recs.append({"kind": "end", "step": steps, "nan_steps_total": 0})
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run_dir


def _check_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == SIZE


def test_one_run_without_gap(tmp_path):
    run = write_log(tmp_path / "uniform", tasks=("caption", "summary"))
    out = tmp_path / "plots" / "curves.png"
    drawn = plot_run_logs([run], out)
    _check_png(out)
    assert drawn["runs"] == ["uniform"] and drawn["size"] == SIZE
    assert drawn["panels"]["train_loss"] == {"uniform": ["all", "caption", "summary"]}
    assert drawn["panels"]["val_loss"] == {"uniform": ["all", "caption", "summary"]}
    assert drawn["image_gap"] is False and drawn["panels"]["image_gap"] == {"uniform": []}
    assert drawn["panels"]["lr"] == {"uniform": ["lora_and_prefix"]}
    assert drawn["panels"]["tokens_per_s"] == {"uniform": ["tokens/s"]}


def test_two_runs_with_gap_side_by_side(tmp_path, capsys):
    a = write_log(tmp_path / "runs" / "uniform", gap=True, groups=("lora_and_prefix", "stage1_tail"))
    b = write_log(tmp_path / "runs" / "phased", tasks=("caption", "cot"))
    out = tmp_path / "curves.png"
    # through the program: a run directory and a log file, names given
    main([str(a), str(b / "train_log.jsonl"), "--out", str(out), "--names", "U", "P"])
    assert "2 run(s) (U, P) with image gap" in capsys.readouterr().out
    _check_png(out)
    drawn = plot_run_logs([a, b / "train_log.jsonl"], tmp_path / "again.png")
    assert drawn["runs"] == ["uniform", "phased"]  # default names: the run directories
    assert drawn["panels"]["train_loss"] == {"uniform": ["all", "caption", "summary", "cot"],
                                             "phased": ["all", "caption", "cot"]}
    assert drawn["image_gap"] is True
    assert drawn["panels"]["image_gap"] == {"uniform": ["all", "caption", "summary", "cot"], "phased": []}
    assert drawn["panels"]["lr"] == {"uniform": ["lora_and_prefix", "stage1_tail"], "phased": ["lora_and_prefix"]}


def test_resumed_log_keeps_the_later_records(tmp_path):
    run = write_log(tmp_path / "r", steps=12)
    lines = (run / "train_log.jsonl").read_text().splitlines()
    # the run was restarted from a checkpoint at step 8: steps 9.. are logged again, with other losses
    again = [{"kind": "start", "step": 8, "total_steps": 12, "world_size": 2}]
    again += [{"kind": "train", "step": s, "loss": 9.0, "tokens_per_s": 1.0, "lr": {"lora_and_prefix": 1e-4}}
              for s in range(9, 13)]
    (run / "train_log.jsonl").write_text("\n".join(lines + [json.dumps(r) for r in again]) + "\n")
    recs = load_run_log(run)
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["loss"] for r in train[8:]] == [9.0] * 4 and train[7]["loss"] != 9.0
    assert [r["step"] for r in recs if r["kind"] == "val"] == [0, 6]  # the old val at step 12 is dropped too


def test_missing_or_empty_log_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_log.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty/train_log\.jsonl: no train or val records"):
        plot_run_logs([tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=r"nowhere/train_log\.jsonl: training log not found"):
        plot_run_logs([tmp_path / "nowhere" / "train_log.jsonl"], tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "train_log.jsonl: no train or val records" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()

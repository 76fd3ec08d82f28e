"""medicalgpt.quickstart.summary: the quickstart's table (each stage's figure, and whether it moved as the stage
intends) and its answers side by side; medicalgpt.quickstart.sample_data: the real-model quickstart's data."""

import json

from medicalgpt.quickstart import summary
from medicalgpt.quickstart.sample_data import write_quickstart_data
from tests.helpers import write_jsonl


def write_run(folder, history, final_eval=None, global_step=None):
    folder.mkdir(parents=True)
    state = {"log_history": history, "global_step": global_step or len(history)}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if final_eval is not None:
        (folder / "eval_results.json").write_text(json.dumps(final_eval))
    return str(folder)


def test_each_stage_is_judged_by_its_own_figure(tmp_path):
    sft_log = [{"step": 0, "eval_loss": 2.83}, {"step": 1, "loss": 2.7}, {"step": 6, "loss": 3.0}]
    sft = write_run(tmp_path / "sft", sft_log, final_eval={"eval_loss": 2.79}, global_step=6)
    ppo = write_run(tmp_path / "ppo", [{"step": 1, "score": -0.5}, {"step": 2, "score": -0.8}])
    dpo = write_run(tmp_path / "dpo", [{"step": 1, "rewards/margins": 0.0, "loss": 0.69},
                                       {"step": 2, "rewards/margins": 0.3, "loss": 0.6}])  # fmt: skip
    rows = {row["stage"]: row for row in (summary.summarize_run(p, n) for n, p in
                                          (("SFT", sft), ("PPO", ppo), ("DPO", dpo)))}  # fmt: skip
    # SFT: the held-out loss before (eval_on_start) and after (eval_results.json), not the noisy training loss
    assert (rows["SFT"]["figure"], rows["SFT"]["first"], rows["SFT"]["last"]) == ("eval_loss (down)", 2.83, 2.79)
    assert rows["SFT"]["moved"] == "as intended"
    assert rows["PPO"]["figure"] == "score (up)" and rows["PPO"]["moved"].startswith("not as intended: ")
    assert (rows["DPO"]["figure"], rows["DPO"]["moved"]) == ("rewards/margins (up)", "as intended")
    table = summary.format_table(list(rows.values()))
    assert table.splitlines()[0].split() == ["stage", "seconds", "figure", "first", "last", "moved", "output"]


def test_answers_are_shown_side_by_side_per_question(tmp_path):
    questions = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Fever?"}]},
                 {"prompt": "Headache?"}]  # fmt: skip
    base = write_jsonl(tmp_path / "base.jsonl", [{**q, "output": f"base {i}"} for i, q in enumerate(questions)])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{**q, "output": f"sft\n{i}"} for i, q in enumerate(questions)])
    text = summary.format_answers([("base", str(base)), ("SFT", str(sft))])
    assert text.splitlines()[:6] == [
        "Q1. Fever?",
        "  base model | base 0",
        "  after SFT  | sft 0",
        "",
        "Q2. Headache?",
        "  base model | base 1",
    ]


def test_quickstart_data_holds_out_english_sft_records(tmp_path):
    trained, held_out = write_quickstart_data(str(tmp_path), heldout=6)
    train = [json.loads(line) for line in (tmp_path / "sft" / "train.jsonl").open(encoding="utf-8")]
    evaluation = [json.loads(line) for line in (tmp_path / "sft" / "heldout.jsonl").open(encoding="utf-8")]
    assert (len(train), len(evaluation)) == (trained, held_out) == (21, 6)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in evaluation}
    for path in ("sft/train.jsonl", "sft/heldout.jsonl", "dpo/train.jsonl", "questions.jsonl"):
        text = (tmp_path / path).read_text(encoding="utf-8")
        assert not any("\u4e00" <= char <= "\u9fff" for char in text), path

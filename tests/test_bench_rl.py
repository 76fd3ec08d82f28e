"""bench/rl_time_split.py's accounting: each second charged to exactly one part, nested parts not counted twice."""

import itertools

from bench import rl_time_split


def test_nested_parts_are_charged_exclusively(monkeypatch):
    clock = itertools.count()  # every reading of either clock advances one second
    monkeypatch.setattr(rl_time_split.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(rl_time_split.time, "process_time", lambda: 0.0)
    timer = rl_time_split.PartTimer()

    class Trainer:
        def generate(self):
            return "responses"

        def step(self):
            return self.generate()

    trainer = Trainer()
    counted = []
    rl_time_split.wrap(trainer, "generate", timer, "generation", lambda part, result: counted.append((part, result)))
    with timer.part("optimisation"):  # readings: push 0; generation push 1, pop 2; pop 3
        assert trainer.step() == "responses"
    assert counted == [("generation", "responses")]
    assert timer.wall["optimisation"] == 2.0 and timer.wall["generation"] == 1.0
    report = timer.report(peak_gflops=1.0)
    assert report["total_wall_s"] == 3.0
    assert {row["part"]: row["share"] for row in report["parts"]}["generation"] == round(1 / 3, 3)
    timer.count("generation", 10, 4e9)
    rows = {row["part"]: row for row in timer.report(peak_gflops=1.0)["parts"]}
    assert rows["generation"]["tokens_per_s"] == 10.0 and rows["generation"]["mfu"] == 4.0

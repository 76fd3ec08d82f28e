"""The choice task while SFT trains: ChoiceEvalCallback, and the flags of supervised_finetuning.py that drive it.
The scoring is medicalgpt/eval/choice.py's, as `evaluate.py --task choice` scores."""

from dataclasses import dataclass, field

from transformers import TrainerCallback

from medicalgpt.eval.choice import run_choice
from medicalgpt.eval.items import load_eval_items


@dataclass
class ChoiceEvalArguments:
    """supervised_finetuning.py's flags for the choice task during training."""

    choice_eval_file: str | None = field(
        default=None,
        metadata={
            "help": "Exam questions (evaluate.py --task choice format) scored during training: "
            "logs choice_accuracy (default: none)."
        },
    )
    choice_eval_steps: int = field(
        default=100, metadata={"help": "Score --choice_eval_file every N optimizer steps (0: only at the end)."}
    )
    choice_eval_n_shot: int = field(default=0, metadata={"help": "Solved examples before each question."})

    def __post_init__(self):
        if self.choice_eval_steps < 0 or self.choice_eval_n_shot < 0:
            raise ValueError("--choice_eval_steps and --choice_eval_n_shot must be at least 0")

    def load_items(self, skip_invalid=False):
        """The validated items of --choice_eval_file (path:line errors before any model loads), or None."""
        return (
            load_eval_items(self.choice_eval_file, "choice", skip_invalid=skip_invalid)
            if self.choice_eval_file
            else None
        )


class ChoiceEvalCallback(TrainerCallback):
    """Runs the choice task every `eval_steps` optimizer steps (and at the end of training) and logs
    `choice_accuracy` through the trainer (console, trainer_state.json, TensorBoard):

        items = load_eval_items("data/eval/choice.jsonl", "choice")
        trainer.add_callback(ChoiceEvalCallback(trainer, items, template, eval_steps=50))

    supervised_finetuning.py does this with `--choice_eval_file data/eval/choice.jsonl --choice_eval_steps 50`.

    Prompts are rendered with `template` (the SFT template), as `evaluate.py --task choice` renders them. Every rank
    scores every item (ZeRO-3 needs all ranks in each forward); rank 0 logs."""

    def __init__(self, trainer, items, template, eval_steps, n_shot=0, batch_size=8, system_prompt=None):
        self.trainer, self.items, self.template = trainer, items, template
        self.eval_steps, self.n_shot, self.batch_size = eval_steps, n_shot, batch_size
        self.system_prompt = system_prompt
        self.last_step, self.engine = None, None

    def evaluate(self, model, tokenizer, step):
        from medicalgpt.serve.chat import ChatEngine

        was_training = model.training
        if self.engine is None or self.engine.model is not model:  # ChatEngine() puts the model in eval mode
            self.engine = ChatEngine(model, tokenizer, self.template, system_prompt=self.system_prompt)
        try:
            metrics, _ = run_choice(
                model, tokenizer, self.items, self.engine.encode, self.n_shot, self.batch_size, False
            )
        finally:
            model.train(was_training)
        self.last_step = step
        self.trainer.log({"choice_accuracy": metrics["accuracy"]})
        return metrics

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.evaluate(model, processing_class, state.global_step)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.last_step != state.global_step:
            self.evaluate(model, processing_class, state.global_step)

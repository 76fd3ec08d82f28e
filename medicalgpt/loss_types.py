"""The loss types of trl's DPO, CPO (SimPO), KTO and GRPO trainers as supported features: which to use when, what
each needs, and the combinations that cannot work, refused before anything loads.

trl accepts most `--loss_type` values with any other option: some then fail only after the model has loaded (an
unknown name, KTO with a batch of one), and others train without a word on settings that do nothing
(`--label_smoothing` with DPO's default sigmoid loss, CISPO's weight cap left at the clip range 0.2, Dr. GRPO with
the per-group std scaling its paper removes). `check_loss_options` turns each into a one-line UsageError naming the
flag to add or drop; `loss_table` is the table `--help` prints under the script's description. Called by
`medicalgpt.parser.parse_args` for every script whose trainer config has a `loss_type`.
"""

from medicalgpt.errors import UsageError

# name -> (what it needs, when to use it). Each table keeps trl 1.16's names and its default first.
DPO_LOSSES = {
    "sigmoid": ("", "DPO (default): pairs of a better and a worse answer"),
    "ipo": ("--beta is IPO's tau (0.1-1)", "small, near-deterministic data: DPO would push margins forever"),
    "robust": ("--label_smoothing in (0, 0.5)", "noisy labels: label_smoothing is the share you think flipped"),
    "exo_pair": ("--label_smoothing > 0 (1e-3)", "EXO: mode-seeking, keeps the best answer, not an average"),
    "hinge": ("", "SLiC: a margin of 1/beta, no gain from pushing past it"),
    "sigmoid_norm": ("", "answers of very different lengths: per-token log-probs"),
    "nca_pair": ("", "raise the chosen answer's likelihood, not only its lead"),
    "bco_pair": ("", "BCO: chosen and rejected scored separately"),
    "apo_zero": ("", "chosen answers better than the model's own (doctors')"),
    "apo_down": ("", "chosen answers worse than the model's own: lower both"),
    "sppo_hard": ("", "SPPO with hard win/lose labels (self-play iterations)"),
    "aot": ("--per_device_train_batch_size >= 2", "AOT: aligns the distribution of margins in each batch"),
    "aot_unpaired": ("--per_device_train_batch_size >= 2", "AOT when chosen and rejected are not matched"),
    "discopop": ("--discopop_tau (0.05)", "DiscoPOP: a discovered logistic/exponential blend"),
    "sft": ("another loss beside it", "RPO (sigmoid sft): keeps the chosen answers likely"),
}
CPO_LOSSES = {
    "sigmoid": ("", "CPO (default): no reference model; + cpo_alpha x chosen NLL"),
    "simpo": ("--simpo_gamma, --beta ~2", "SimPO: length-normalised, margin gamma; --cpo_alpha 0: pure"),
    "alphapo": ("--alpha", "AlphaPO: SimPO with its reward reshaped (cpo_alpha 0)"),
    "hinge": ("", "SLiC's margin loss, no reference model"),
    "ipo": ("", "IPO's squared loss, length-normalised, no reference model"),
}
KTO_LOSSES = {
    "kto": ("--per_device_train_batch_size >= 2", "KTO (default): thumbs up / down on single answers"),
    "apo_zero_unpaired": ("", "desirable answers better than the model's own; no KL"),
}
GRPO_LOSSES = {
    "dapo": ("", "DAPO (default): token-level; with its clip-higher (below)"),
    "grpo": ("", "GRPO as published: per-answer length normalisation"),
    "dr_grpo": ("--scale_rewards none", "Dr. GRPO: no length or question-difficulty bias"),
    "bnpo": ("", "token-level over the local batch"),
    "cispo": ("--epsilon_high > 1 (5.0)", "CISPO: clips importance weights; every token still learns"),
    "sapo": ("", "SAPO: a soft temperature gate instead of hard clipping"),
    "luspo": ("--importance_sampling_level sequence", "LUSPO: GSPO with each answer's loss scaled by its length"),
    "vespo": ("--importance_sampling_level token", "VESPO: smooth sequence-level weights, no clipping"),
}
GRPO_NOTES = [
    "GSPO: --importance_sampling_level sequence (one importance ratio per answer; the paper pairs it with grpo).",
    "DAPO's clip-higher: --epsilon_high above --epsilon (0.28 vs 0.2); --mask_truncated_completions True drops",
    "answers cut at --response_length from the loss. Two-sided clipping (INTELLECT-2): --delta above 1 + epsilon.",
]
TABLES = {  # trainer config class name -> (heading, losses, notes)
    "DPOConfig": ("--loss_type (several combine: --loss_type sigmoid sft --loss_weights 1 1)", DPO_LOSSES, []),
    "CPOConfig": ("--loss_type", CPO_LOSSES, []),
    "KTOConfig": ("--loss_type", KTO_LOSSES, []),
    "GRPOConfig": ("--loss_type", GRPO_LOSSES, GRPO_NOTES),
    "PPOConfig": ("--loss_type, with --rl_algorithm grpo", GRPO_LOSSES, GRPO_NOTES),  # ppo_training.py's help
}
SMOOTHED_DPO = ("robust", "exo_pair", "aot", "aot_unpaired")  # the DPO losses that read --label_smoothing
F_DIVERGENCE_DPO = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def loss_table(config_class):
    """The loss types of `config_class`'s trainer as --help text (empty when it has none). A script's subclass of a
    trainer's config (cpo_training.py's CpoConfig) is tabled as the config it extends."""
    tabled = [cls.__name__ for cls in config_class.__mro__ if cls.__name__ in TABLES]
    if not tabled:
        return ""
    heading, losses, notes = TABLES[tabled[0]]
    lines = [f"Loss types, {heading}:", f"  {'name':<17} {'needs':<36} use it when"]
    lines += [f"  {name:<17} {needs or '-':<36} {when}" for name, (needs, when) in losses.items()]
    return "\n".join(lines + [f"  {note}" for note in notes])


def given_options(argv):
    """The option names on a command line: `--scale_rewards none` and `--scale-rewards=none` give scale_rewards."""
    return {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def check_loss_options(config, given=()):
    """Raise UsageError for a loss type that cannot work with the other options (`given`: the options named on the
    command line, for the checks that depend on a default being left as it is)."""
    checks = {"DPOConfig": _check_dpo, "CPOConfig": _check_cpo, "KTOConfig": _check_kto, "GRPOConfig": _check_grpo}
    for cls in type(config).__mro__:
        if cls.__name__ in checks:
            checks[cls.__name__](config, set(given))
            return


def _check_known(names, losses):
    unknown = [name for name in names if name not in losses]
    if unknown:
        raise UsageError(f"--loss_type {' '.join(unknown)}: unknown; expected one of {', '.join(losses)}")


def _check_beta(config):
    # 0 makes the preference term a constant (IPO divides by it), a negative value learns the opposite preference
    if not config.beta > 0:
        raise UsageError(f"--beta must be above 0 (how far the policy may move from the reference), got {config.beta}")


def _check_dpo(config, given):
    names = list(config.loss_type)
    _check_known(names, DPO_LOSSES)
    if len(set(names)) < len(names):
        raise UsageError(f"--loss_type {' '.join(names)}: a loss named twice (weigh it with --loss_weights)")
    _check_beta(config)
    smoothing = config.label_smoothing
    if "robust" in names and not 0 < smoothing < 0.5:
        raise UsageError(
            "--loss_type robust needs --label_smoothing in (0, 0.5): the share of flipped labels (0.1), "
            f"got {smoothing}"
        )
    if "exo_pair" in names and smoothing <= 0:
        raise UsageError("--loss_type exo_pair needs --label_smoothing above 0 (EXO's epsilon, e.g. 1e-3)")
    if smoothing and not set(names) & set(SMOOTHED_DPO):
        raise UsageError(
            f"--label_smoothing is read only by the {', '.join(SMOOTHED_DPO)} losses; --loss_type {' '.join(names)} "
            "would ignore it (conservative DPO on noisy labels: --loss_type robust)"
        )
    sorting = [name for name in names if name in ("aot", "aot_unpaired")]
    if sorting and config.per_device_train_batch_size < 2:
        raise UsageError(
            f"--loss_type {sorting[0]} sorts the margins within each batch: it needs --per_device_train_batch_size "
            "2 or more (with 1 it is plain sigmoid DPO)"
        )
    if sorting and config.use_weighting:
        raise UsageError(f"--use_weighting cannot weight --loss_type {sorting[0]}, which reorders the pairs")
    if names == ["sft"]:
        raise UsageError(
            "--loss_type sft alone is supervised fine-tuning on the chosen answers: add a preference loss "
            "(--loss_type sigmoid sft) or run supervised_finetuning.py"
        )
    if config.f_divergence_type != "reverse_kl" and not set(names) <= set(F_DIVERGENCE_DPO):
        raise UsageError(
            f"--f_divergence_type {config.f_divergence_type} works only with the {', '.join(F_DIVERGENCE_DPO)} losses"
        )


def _check_cpo(config, given):
    _check_known([config.loss_type], CPO_LOSSES)
    _check_beta(config)
    if config.cpo_alpha < 0:
        raise UsageError(f"--cpo_alpha weighs the chosen answers' NLL: it must be 0 or more, got {config.cpo_alpha}")
    if config.label_smoothing and config.loss_type not in ("sigmoid", "simpo"):
        raise UsageError(f"--label_smoothing is read only by the sigmoid and simpo losses, not {config.loss_type}")
    if not 0 <= config.label_smoothing < 0.5:
        raise UsageError(f"--label_smoothing must be in [0, 0.5), got {config.label_smoothing}")
    if "simpo_gamma" in given and config.loss_type != "simpo":
        raise UsageError(f"--simpo_gamma is SimPO's target margin: it needs --loss_type simpo, not {config.loss_type}")


def _check_kto(config, given):
    _check_beta(config)
    if config.desirable_weight <= 0 or config.undesirable_weight <= 0:
        raise UsageError("--desirable_weight and --undesirable_weight must be above 0")
    if config.loss_type != "kto":
        return
    if config.per_device_train_batch_size < 2:
        raise UsageError(
            "--loss_type kto estimates its KL term from the other answers in each batch: it needs "
            "--per_device_train_batch_size 2 or more (or --loss_type apo_zero_unpaired, which has no KL term)"
        )
    if config.train_sampling_strategy != "sequential":
        raise UsageError(
            "--loss_type kto pairs each example with its batch neighbours' answers when the data is tokenised: it "
            f"needs --train_sampling_strategy sequential (the data is shuffled once beforehand), not "
            f"{config.train_sampling_strategy}"
        )


def _check_grpo(config, given):
    _check_known([config.loss_type], GRPO_LOSSES)
    level, loss = config.importance_sampling_level, config.loss_type
    if level not in ("token", "sequence"):
        raise UsageError(f"--importance_sampling_level must be token or sequence (GSPO), got {level}")
    if loss == "luspo" and level != "sequence":
        raise UsageError("--loss_type luspo is a sequence-level loss: it needs --importance_sampling_level sequence")
    if loss == "vespo" and level != "token":
        raise UsageError("--loss_type vespo weights whole sequences itself: keep --importance_sampling_level token")
    if loss == "dr_grpo" and "scale_rewards" not in given:
        raise UsageError(
            "--loss_type dr_grpo: Dr. GRPO also drops the per-group std scaling of the rewards; add --scale_rewards "
            "none (or name --scale_rewards group to keep it)"
        )
    high = config.epsilon_high
    if loss == "cispo" and (high is None or high <= 1):
        raise UsageError(
            "--loss_type cispo caps the importance weights at --epsilon_high: give it above 1 (the paper's 5.0); "
            f"{'unset it is --epsilon ' + str(config.epsilon) if high is None else f'{high} would clip every token'}"
        )
    if loss != "cispo" and high is not None and high < config.epsilon:
        raise UsageError(f"--epsilon_high {high} is below --epsilon {config.epsilon}: clip-higher (DAPO) raises it")
    upper = 1 + (high if high is not None else config.epsilon)
    if config.delta is not None and config.delta <= upper:
        raise UsageError(f"--delta {config.delta} must be above 1 + the upper clip range ({upper:g}) to clip anything")

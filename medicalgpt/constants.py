"""Values several floors of the package agree on."""

IGNORE_INDEX = -100  # a label the loss ignores (torch's cross_entropy default): prompts, padding, dropped tokens

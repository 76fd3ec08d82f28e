"""Conversation templates, kept importable as `template` for MedicalGPT users (`from template import
get_conv_template`); they live in medicalgpt/templates/."""

from medicalgpt.templates import *  # noqa: F403
from medicalgpt.templates import __all__  # noqa: F401

"""Configuration fields that carry their help, choices and value constraint.

`field` declares one; `validate` in `config` checks every field's
constraint (`Range`, `OneOf`) where it is declared, then the rules between
fields.
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Range:
  """A field's numeric bounds; `label` and `text` override the message."""

  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  label: str = ''
  text: str = ''

  def describe(self) -> str:
    if self.text:
      return self.text
    if self.high is None:
      return f'{">" if self.low_open else ">="} {self.low}'
    return (f'in {"(" if self.low_open else "["}{self.low:g},'
            f' {self.high:g}{")" if self.high_open else "]"}')

  def allows(self, value) -> bool:
    above = value > self.low if self.low_open else value >= self.low
    if self.high is None:
      return above
    return above and (value < self.high if self.high_open
                      else value <= self.high)


@dataclasses.dataclass(frozen=True)
class OneOf:
  """A field whose value must be one of `values` (not a flag enum)."""

  values: tuple

  def describe(self) -> str:
    return f'one of {self.values}'

  def allows(self, value) -> bool:
    return value in self.values


def field(default, help_text: str, choices: tuple = (), constraint=None):
  """A configuration field: its flag help, enum choices and value constraint.

  `constraint` (a `Range` or `OneOf`) is checked by `validate`; None, where
  the field allows it, is not checked.
  """
  return dataclasses.field(
      default=default,
      metadata={'help': help_text, 'choices': choices,
                'constraint': constraint},
  )


def help_text(field: dataclasses.Field) -> str:
  return field.metadata['help']


def choices(field: dataclasses.Field) -> tuple:
  return field.metadata['choices']


def is_utf8(text: str) -> bool:
  try:
    text.encode('utf-8')
    return '\x00' not in text
  except UnicodeEncodeError:
    return False

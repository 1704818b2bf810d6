"""Progress of the long passes (stats, cache_latents, fid_stats, eval generation and scoring,
eval_recon): tqdm on process 0, a live bar on a terminal, one log line every LOG_EVERY_S
seconds otherwise (a pod's logs are files); images/s and ETA in both."""
from __future__ import annotations

import logging
import sys
from typing import Optional

LOG_EVERY_S = 30.0


class _LogLines:
  """A file for tqdm that turns each refresh into one log line."""

  def write(self, text: str) -> None:
    text = text.strip("\r\n ")
    if text:
      logging.getLogger("rae_jax.progress").info(text)

  def flush(self) -> None:
    pass


def bar(total: Optional[int], desc: str, unit: str = "img", initial: int = 0):
  """A tqdm bar (use as a context manager, `.update(n)`); silent on processes other than 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  quiet = jax.process_index() != 0
  if sys.stderr.isatty():
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=quiet,
                dynamic_ncols=True, smoothing=0.1)
  return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=quiet,
              file=_LogLines(), mininterval=LOG_EVERY_S, maxinterval=LOG_EVERY_S, ascii=True,
              ncols=100, smoothing=0.1)

"""The parts of :class:`dkgm_aug.trainer.Trainer`, which puts them together: the data feed
(:mod:`.data`), the resumable training state (:mod:`.state`), the EMA weights (:mod:`.ema`) and
the process group (:mod:`.distributed`)."""

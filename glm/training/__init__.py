"""Finetuning GLM with the PaddleNLP Trainer: what every task script (generation, cloze, pretraining)
shares.

  arguments.py     the shared flags; a recipe JSON followed by overriding flags
  trainer.py       GLMTrainer: THUDM's schedule, resumable shuffle, complete-only checkpoints, NaN guard
  driver.py        resume, loading with LoRA, train -> save -> evaluate, data-parallel exit
  crash_safety.py  the output-dir lock, staged checkpoints and final saves, the newest complete checkpoint
  run_record.py    what determines a run's result, recorded with each checkpoint; a resume that differs is refused
  console.py       what a run prints: header, progress bars, the results table, the files
  curve.py         training_curve.png
"""

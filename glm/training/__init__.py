"""Training GLM with the PaddleNLP Trainer: the skeleton every task (generation, cloze, pretraining) plugs
into.

  task.py         Task and run_task: precision, resume, seed, loading, data, trainer, train and evaluate
  arguments.py    the shared flags; a recipe JSON followed by overriding flags
  resume.py       where a run starts (a decision that only reads), and what it does to --output_dir
  driver.py       once loaded: untrained score, train, save the final model, evaluate, record
  trainer.py      GLMTrainer: THUDM's schedule, resumable shuffle, complete-only checkpoints, NaN guard
  checkpoints.py  staged checkpoints and final saves, the newest complete checkpoint
  run_record.py   what determines a run's result, recorded with each checkpoint; a resume that differs is refused
  console.py      what a run prints: header, progress bar, the results table, the files
  curve.py        training_curve.png
"""

"""GLM pretraining: autoregressive blank infilling on raw text, THUDM's objective on the shared driver.

  corpus.py     prepared corpora: a memory-mapped token file, a document index, the tokenizer's fingerprint
  windows.py    windows of a corpus, as THUDM's BlockDataset cuts them
  objective.py  the objective's flags and the examples of a batch (THUDM's ConstructBlockStrategy)
  dataset.py    the training stream and the held-out sets, pure functions of (corpus, seed, index)
  pretrain.py   the run: checks, --dump_examples, the Trainer with held-out loss per objective
"""

"""GLM's understanding tasks, on the same model and inputs as generation (THUDM's semantics).

  multiple_choice.py  THUDM's zero-shot rows, their packed examples and per-choice scores, accuracy
  cloze.py            ClozeTrainer: cloze finetuning evaluated by choice scores
  language_model.py   perplexity over LMDataset windows and the LAMBADA last-word cloze
"""

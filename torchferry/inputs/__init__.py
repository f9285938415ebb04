"""The torch-free input contract of each task beyond images: the input spec a model file carries (plain data,
bounded, checked) and the numpy function that turns raw inputs (JSON rows, texts) into the model's array.

Training, the export and the server call the same function, so what the server feeds the model is what the
model was trained on. Imports the standard library, numpy and `torchferry.contract` only; every package may
import it, and the serving image copies it.
"""

"""Batch prediction: score a folder, a list file or a bucket of images with an exported model on Ray Data, and
write the answers to Parquet or CSV (`python -m serve.batch`). Decoding, preprocessing, the proof and the top-k
are the server's own code (torchferry.serve); no torch."""

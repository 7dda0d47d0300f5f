"""Serving-side batching: a batched UnCLIPScheduler step over per-sample timesteps, and the step-level batcher
that lets requests join and leave a running denoising batch between steps (see ``batcher.py``).
"""

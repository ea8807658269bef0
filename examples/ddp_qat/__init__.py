"""Distributed PTQ and QAT with DistributedDataParallel: see README.md and train.py."""

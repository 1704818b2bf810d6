"""Evaluation: FID Inception, FID/IS/precision-recall, reconstruction metrics, sharded sampling."""

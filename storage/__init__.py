"""Blob stores (`file://`, `s3://`), key layout, presigned URLs and the mask codecs."""

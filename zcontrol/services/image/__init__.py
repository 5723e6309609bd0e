"""
The image service: images registered from a URL and downloaded to backup storage.
"""

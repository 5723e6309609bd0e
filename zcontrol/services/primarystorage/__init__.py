"""
The primary storage service: LocalStorage and NFS primary storage served through the KVM
agents of the hosts, image caches, volumes on storage, capacity.
"""

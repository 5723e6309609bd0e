"""
The store's components, one module per resource group, all run on the one pool of
L{zcontrol.db._store.AdbapiStore} (which mixes them in, as buildbot's C{db} connector
components): L{base} (the L{Db} wrapper, migrations, the generic get/insert/update/delete/query,
edge checks, holders), L{hosts} (hosts, primary storage capacity, audit), L{ips} (used IPs of
L3 networks), L{vms} (VM state), L{jobs} and L{nodes} (management node heartbeats).
"""

"""Service registries as config sources: SOFARPC providers found in ZooKeeper (endpoints of
clusters with ``discovery.zookeeper``) and Bolt listeners published there (``publish``).

urls.py: provider URLs and the subscriber's filter (pure); zk.py: kazoo bridged to the loop;
source.py: what the supervisor starts, fills configs from, and stops.
"""

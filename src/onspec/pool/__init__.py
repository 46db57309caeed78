"""Several drafts for one target, one per kind of traffic, and the routers that pick one."""

"""Analysis methods the studies compose: probes, CKA, the logit lens, phases, feature selectivity and its sets,
diffuseness, co-activation, feature roles and cards."""

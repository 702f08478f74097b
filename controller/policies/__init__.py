"""Pre-warm policies: one interface (`base.Policy`), chosen per function by name (`registry.make`)."""

"""The metered, memoized model gateway and what governs it: prices, model policies, budgets."""

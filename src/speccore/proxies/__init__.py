"""Small models standing in for the target: a model derived from the target by dropping layers
and healing (:mod:`.derive`), and how well any small model's scores agree with the target's
(:mod:`.agree`)."""

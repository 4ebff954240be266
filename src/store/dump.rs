//! Streaming NAR serializer over a physical store directory.

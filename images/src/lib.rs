//! Builds Muster's node images.

//! Creates and removes a lab's namespaces, underlay bridge and veths. (Being written.)

//! What the agent and the plugin share: CNI spec types, the node state file and the socket protocol.

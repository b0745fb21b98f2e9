//! Moving a process into a holder's namespaces. (API outline; being written.)

/* Consistency check of a qcow2 file, like qemu-img check. (Being written.) */
#ifndef COW_QCOW2_CHECK_H
#define COW_QCOW2_CHECK_H
#endif

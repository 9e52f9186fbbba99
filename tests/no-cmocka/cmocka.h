/* SPDX-License-Identifier: BSD-3-Clause */
/* Found instead of <cmocka.h> when configure did not find cmocka (see
   Makefile.am): the C unit tests need it, the plugin and the tool do not. */
#error "the C unit tests need cmocka: install libcmocka-dev (Debian) or cmocka-devel, then run configure again"
